# shellcheck shell=bash
# Helpers the launch scripts source; not a command of its own.

# One shell word: as is when it is plain, else single-quoted, so that a shell reads it back exactly.
quote() {
  if [[ "$1" =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The arguments as one line of shell words.
quote_words() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  printf '%s' "${words[*]}"
}

# run_or_print DRY_RUN COMMAND...: prints the command as one line (DRY_RUN=true) or runs it.
run_or_print() {
  local dry_run="$1"
  shift
  if [[ "$dry_run" == true ]]; then
    quote_words "$@"
    printf '\n'
  else
    "$@"
  fi
}

# exec_or_print DRY_RUN COMMAND...: the same for a script's last command, which replaces this shell
# (signals reach it directly); a dry run ends here.
exec_or_print() {
  if [[ "$1" == true ]]; then
    run_or_print "$@"
    exit 0
  fi
  shift
  exec "$@"
}
