#!/usr/bin/env bash
# Sets up every worker of a Cloud TPU VM slice (the repository and a .venv with JAX's TPU build),
# and starts, watches and stops one kdjax command on all of them, through gcloud's tpu-vm ssh.
# shellcheck disable=SC2016 # single-quoted text here is shell code that runs on the workers
set -euo pipefail

usage() {
  cat >&2 <<'TEXT'
usage: launch/tpu_pod.sh setup  [OPTIONS] [--repo-url=URL [--ref=REF]] [--python=PYTHON]
       launch/tpu_pod.sh [run]  [OPTIONS] [--name=RUN] COMMAND --config=FILE --workdir=DIR [...]
       launch/tpu_pod.sh logs   [OPTIONS] [--name=RUN] [--lines=N] [--follow | --fetch=LOCAL_DIR]
       launch/tpu_pod.sh status [OPTIONS] [--name=RUN]
       launch/tpu_pod.sh stop   [OPTIONS] [--name=RUN] [--grace=SECONDS]

setup puts the repository at DIR on every worker of the TPU VM slice NAME and runs
`make install ACCEL=tpu` there, which makes DIR/.venv with JAX's TPU build. kdjax needs
Python >= 3.11 and stock TPU VM images have 3.10, so setup installs uv from PyPI (with the image's
pip) and a Python 3.12 through uv, and makes .venv with it; --python names an interpreter of yours
instead. The workers need make, network access and, for --repo-url, git. Running it again updates
the workers.

run (the default) starts `cd DIR && .venv/bin/python -m kdjax COMMAND ...` on all workers,
detached from the ssh session: closing it, or this machine, does not end the run. Worker N writes
its output to DIR/logs/RUN/worker-N.log (DIR/logs/latest is the last run). Everything from COMMAND
on is passed unchanged; JAX finds the other workers by itself. Before starting, run ends the
processes that still hold the TPU (/dev/accel*, /dev/vfio/*) and removes a stale
/tmp/libtpu_lockfile; it refuses while a run it started is still alive.

logs prints the last lines of each worker's log, each line prefixed by its worker; --follow keeps
printing as they grow (Ctrl-C ends the following, not the run); --fetch copies the logs into
LOCAL_DIR here instead. status says whether the run is alive on each worker, with its log's last
line. stop sends the run SIGTERM on every worker: kdjax saves a checkpoint at a step all its
processes agree on and exits, and the same run command resumes; what still runs after the grace
period is killed.

OPTIONS:
  --tpu=NAME            the TPU VM (default: $TPU_NAME)
  --zone=ZONE           its zone (default: $TPU_ZONE)
  --project=PROJECT     its Cloud project (default: $TPU_PROJECT, else gcloud's configured one)
  --repo-dir=DIR        the repository on the workers (default: this repository's path, relative
                        to the home directory when it lies inside it)
  --internal-ip         connect to the workers' internal IP addresses (gcloud's flag)
  --tunnel-through-iap  connect through Identity-Aware Proxy (gcloud's flag)
  --gcloud-flag=FLAG    one more flag for every gcloud ssh and scp, e.g.
                        --gcloud-flag=--strict-host-key-checking=no (repeatable)
  --env KEY=VALUE       export KEY=VALUE on every worker before the action's commands (repeatable)
  --dry-run             print the commands, one per line, instead of running them
setup only:
  --repo-url=URL        have every worker fetch the repository from URL (default: copy this
                        repository's last commit, git archive HEAD; uncommitted changes stay here)
  --ref=REF             the branch, tag or commit to fetch from URL (default: its default branch)
  --python=PYTHON       the interpreter (>= 3.11) that makes .venv (default: uv's Python 3.12)
run, logs, status, stop:
  --name=RUN            the run (run's default: the time, YYYYmmdd-HHMMSS in UTC; the others':
                        the latest run)
logs only:
  --lines=N             how many last lines of each log (default: 20)
  --follow              keep printing the logs as they grow
  --fetch=LOCAL_DIR     copy the logs into LOCAL_DIR instead of printing them
stop only:
  --grace=SECONDS       how long the run may take to save and exit before it is killed
                        (default: 120)

The workdir must be a location every worker reaches: gs://BUCKET/... (kdjax writes there
directly), or a file system every worker mounts.
TEXT
  exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$repo/launch/common.sh"

action=run
dry_run=false
tpu="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
# ssh starts in the home directory, so a path inside it is given relative to it.
repo_dir="${repo#"$HOME"/}"
repo_url=""
ref=""
python=""
name=""
lines=""
follow=""
fetch=""
grace=""
extra_flags=()
envs=()
# The options that name the slice and reach it, to repeat in the commands printed after a run.
again=()
while (($#)); do
  case "$1" in
    setup | run | logs | status | stop) action="$1" ;;
    --dry-run) dry_run=true ;;
    --tpu=*) tpu="${1#*=}" && again+=("$1") ;;
    --zone=*) zone="${1#*=}" && again+=("$1") ;;
    --project=*) project="${1#*=}" && again+=("$1") ;;
    --repo-dir=*) repo_dir="${1#*=}" && again+=("$1") ;;
    --internal-ip | --tunnel-through-iap) extra_flags+=("$1") && again+=("$1") ;;
    --gcloud-flag=*) extra_flags+=("${1#*=}") && again+=("$1") ;;
    --env=*) envs+=("${1#*=}") ;;
    --env)
      (($# > 1)) || usage
      shift
      envs+=("$1")
      ;;
    --repo-url=*) repo_url="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --lines=*) lines="${1#*=}" ;;
    --follow) follow=true ;;
    --fetch=*) fetch="${1#*=}" ;;
    --grace=*) grace="${1#*=}" ;;
    -h | --help) usage ;;
    -*)
      echo "tpu_pod.sh: unknown option $1 (kdjax's own options go after COMMAND)" >&2
      usage
      ;;
    *) break ;;
  esac
  shift
done
# run needs a command, the others take none; each action's own options go with it only, and --ref
# goes with --repo-url.
case "$action" in
  setup)
    (($# == 0)) && [[ -z "$name$lines$follow$fetch$grace" ]] && [[ -n "$repo_url" || -z "$ref" ]]
    ;;
  run) (($#)) && [[ -z "$repo_url$ref$python$lines$follow$fetch$grace" ]] ;;
  logs) (($# == 0)) && [[ -z "$repo_url$ref$python$grace" && (-z "$follow" || -z "$fetch") ]] ;;
  status) (($# == 0)) && [[ -z "$repo_url$ref$python$lines$follow$fetch$grace" ]] ;;
  stop) (($# == 0)) && [[ -z "$repo_url$ref$python$lines$follow$fetch" ]] ;;
esac || usage
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: name the TPU VM and its zone with --tpu=NAME --zone=ZONE" \
    "(or TPU_NAME, TPU_ZONE)" >&2
  exit 2
fi
# Run names become file names on the workers; `latest` is the link to the last run.
if [[ -n "$name" && ! "$name" =~ ^[[:alnum:]][[:alnum:]._-]*$ ]] ||
  [[ "$action" == run && "$name" == latest ]]; then
  echo "tpu_pod.sh: --name=$name: a run name is letters, digits and . _ - (and not 'latest')" >&2
  exit 2
fi
for number in "$lines" "$grace"; do
  if [[ -n "$number" && ! "$number" =~ ^[0-9]+$ ]]; then
    echo "tpu_pod.sh: --lines and --grace take a whole number, not '$number'" >&2
    exit 2
  fi
done
for variable in ${envs[@]+"${envs[@]}"}; do
  if [[ ! "$variable" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    echo "tpu_pod.sh: --env takes KEY=VALUE, not '$variable'" >&2
    exit 2
  fi
done

flags=("--zone=$zone")
if [[ -n "$project" ]]; then flags+=("--project=$project"); fi
flags+=(${extra_flags[@]+"${extra_flags[@]}"} --worker=all)
dir="$(quote "$repo_dir")"

# What every command on a worker starts with: the --env variables.
exports=""
for variable in ${envs[@]+"${envs[@]}"}; do exports+="export $(quote "$variable") && "; done
# The worker's number, from the TPU VM's metadata (or TPU_WORKER_ID where the environment gives it).
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
worker='w=${TPU_WORKER_ID:-$(curl -sf --max-time 10 -H Metadata-Flavor:Google '"$metadata"
worker+=' || hostname)}'
# Whether a pid is a live kdjax process: a pid file outlives its process, and after a reboot its
# number may belong to another program.
alive='alive() { kill -0 "$1" 2>/dev/null && grep -qa kdjax "/proc/$1/cmdline"; }'

# on_workers RUN SHELL_COMMAND: runs (or prints) SHELL_COMMAND on every worker, after the --env
# exports, RUN being run_or_print or exec_or_print.
on_workers() {
  "$1" "$dry_run" gcloud compute tpus tpu-vm ssh "$tpu" "${flags[@]}" "--command=$exports$2"
}

# in_run STEP...: one line of shell that goes into DIR on a worker, with the worker's number in $w
# and its files of run RUN in $run, $log and $pid_file, and runs each STEP in turn.
in_run() {
  local line step
  line="cd $dir && $worker || exit 1; run=logs/$name"
  line+='; log=$run/worker-$w.log; pid_file=$run/worker-$w.pid'
  for step in "$@"; do line+="; $step"; done
  printf '%s' "$line"
}

# copy_repository: puts the repository at DIR on every worker.
copy_repository() {
  if [[ -n "$repo_url" ]]; then
    # REF fetched into an initialised directory, so that a second setup updates it in place.
    local fetch
    fetch="git fetch -q --depth=1 $(quote_words "$repo_url" "${ref:-HEAD}")"
    on_workers run_or_print \
      "git init -q $dir && cd $dir && $fetch && git checkout -q --force FETCH_HEAD"
    return
  fi
  if [[ -n "$(git -C "$repo" status --porcelain)" ]]; then
    echo "tpu_pod.sh: copying HEAD; the uncommitted changes here are not copied" >&2
  fi
  archive_dir="$(mktemp -d)"
  trap 'rm -rf "$archive_dir"' EXIT
  local archive="$archive_dir/kdjax.tar.gz"
  run_or_print "$dry_run" git -C "$repo" archive --format=tar.gz "--output=$archive" HEAD
  run_or_print "$dry_run" gcloud compute tpus tpu-vm scp "$archive" "$tpu:kdjax.tar.gz" \
    "${flags[@]}"
  on_workers run_or_print "mkdir -p $dir && tar -xzf kdjax.tar.gz -C $dir && rm kdjax.tar.gz"
}

# install_venv: makes DIR/.venv on every worker with JAX's TPU build (a plain `make install` would
# give the workers JAX's CPU build).
install_venv() {
  if [[ -n "$python" ]]; then
    on_workers run_or_print "cd $dir && make install ACCEL=tpu PYTHON=$(quote "$python")"
    return
  fi
  # uv from PyPI through the image's pip, into ~/.local (PIP_BREAK_SYSTEM_PACKAGES lets newer pips
  # install there on images whose Python is marked as the system's), then uv's own Python 3.12,
  # looked up from the home directory so that no .venv is taken for it.
  local uv='export PATH="$HOME/.local/bin:$PATH" && { command -v uv >/dev/null ||'
  uv+=' PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user uv; }'
  uv+=' && uv python install 3.12 && python=$(cd && uv python find 3.12)'
  on_workers run_or_print "cd $dir && $uv && make install ACCEL=tpu PYTHON=\"\$python\""
}

# start_run: ends what still holds the TPU on every worker, then starts kdjax there, detached.
start_run() {
  # A worker refuses while a run started here is alive: ending it by force would lose its steps
  # since the last checkpoint (stop saves one).
  local busy='for p in logs/*/worker-$w.pid; do if [ -f "$p" ] && alive "$(cat "$p")"; then'
  busy+=' echo "worker-$w: run $(basename "$(cd "$(dirname "$p")" && pwd -P)") is still running'
  busy+=' (pid $(cat "$p")); stop it first" >&2; exit 1; fi; done'
  # A crashed run can leave behind processes that hold the TPU's devices, and libtpu's lock file;
  # libtpu then refuses to start ("TPU in use"). They may be root's: sudo where it is allowed.
  local sudo='s=; if sudo -n true 2>/dev/null; then s="sudo -n"; fi'
  local holders='holders() { $s lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u |'
  holders+=' tr "\n" " "; }'
  local end='users=$(holders); if [ -n "$users" ]; then'
  end+=' echo "worker-$w: ending the processes that hold the TPU: $users"; $s kill -9 $users;'
  end+=' n=0; while [ -n "$(holders)" ] && [ $n -lt 30 ]; do sleep 1; n=$((n + 1)); done; fi'
  on_workers run_or_print "$(in_run "$alive" "$busy" "$sudo" "$holders" "$end" \
    '$s rm -f /tmp/libtpu_lockfile')"
  # setsid and nohup: neither the end of the ssh session nor its hang-up signal reach the run; its
  # output goes to the log, so that ssh does not wait for it either. The run writes its pid file
  # once it is in a session of its own, and the shell waits for that before it ends the session.
  local launch
  launch="setsid nohup sh -c $(quote 'echo $$ >"$0" && exec "$@"') \"\$pid_file\""
  launch+=" .venv/bin/python -m kdjax $(quote_words "$@")"' >>"$log" 2>&1 </dev/null &'
  launch+=' n=0; while [ ! -s "$pid_file" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done'
  local started='if [ -s "$pid_file" ]; then echo "worker-$w: started run '"$name"','
  started+=' pid $(cat "$pid_file"), log '"$dir"'/$log"; else'
  started+=' echo "worker-$w: run '"$name"' did not start; see '"$dir"'/$log" >&2; exit 1; fi'
  on_workers run_or_print "$(in_run 'mkdir -p "$run"' 'rm -f "$pid_file"' \
    "ln -sfn $name logs/latest" "$launch" "$started")"
}

# show_logs: prints the end of each worker's log, each line prefixed by its worker (the workers'
# outputs arrive interleaved), and with --follow goes on as they grow.
show_logs() {
  local prefix='while IFS= read -r line || [ -n "$line" ]; do'
  prefix+=' printf "worker-%s: %s\n" "$w" "$line"; done'
  local show='if [ -f "$log" ]; then tail -n '"${lines:-20}${follow:+ -F}"' "$log" | '"$prefix"';'
  show+=' else echo "worker-$w: no log $log"; fi'
  on_workers exec_or_print "$(in_run "$show")"
}

# show_status: whether the run is alive on each worker, and its log's last line.
show_status() {
  local state='if [ ! -f "$pid_file" ]; then echo "worker-$w: no run $run"; exit 0; fi;'
  state+=' pid=$(cat "$pid_file"); state=ended;'
  state+=' if alive "$pid"; then state="running (pid $pid)"; fi;'
  state+=' echo "worker-$w: run $(basename "$(cd "$run" && pwd -P)") $state;'
  state+=' last line: $(tail -n 1 "$log")"'
  on_workers exec_or_print "$(in_run "$alive" "$state")"
}

# stop_run: SIGTERM first, at which kdjax saves a checkpoint at the next step all its processes
# agree on and exits; after the grace period, the run's whole process group (setsid made the run its
# leader) is killed.
stop_run() {
  local grace="${grace:-120}"
  local term='pid=$(cat "$pid_file" 2>/dev/null); if ! alive "$pid"; then'
  term+=' echo "worker-$w: not running"; exit 0; fi;'
  term+=' kill -TERM "$pid"; echo "worker-$w: sent SIGTERM to pid $pid"'
  local ended='n=0; while alive "$pid" && [ $n -lt '"$grace"' ]; do sleep 1; n=$((n + 1)); done'
  local killed='if alive "$pid"; then kill -KILL -- "-$pid";'
  killed+=' echo "worker-$w: still running after '"$grace"' s: killed";'
  killed+=' else echo "worker-$w: stopped"; fi'
  on_workers exec_or_print "$(in_run "$alive" "$term" "$ended" "$killed")"
}

case "$action" in
  setup)
    copy_repository
    install_venv
    ;;
  run)
    name="${name:-$(date -u +%Y%m%d-%H%M%S)}"
    start_run "$@"
    if [[ "$dry_run" == false ]]; then
      connection="$(quote_words ${again[@]+"${again[@]}"})"
      cat >&2 <<TEXT
tpu_pod.sh: run $name started on every worker of $tpu; worker N writes
$repo_dir/logs/$name/worker-N.log there.
  follow it: $0 logs --follow --name=$name $connection
  stop it:   $0 stop --name=$name $connection
TEXT
    fi
    ;;
  *)
    name="${name:-latest}"
    if [[ "$action" == logs && -n "$fetch" ]]; then
      run_or_print "$dry_run" mkdir -p "$fetch"
      exec_or_print "$dry_run" gcloud compute tpus tpu-vm scp \
        "$tpu:$repo_dir/logs/$name/worker-*.log" "$fetch" "${flags[@]}"
    elif [[ "$action" == logs ]]; then
      show_logs
    elif [[ "$action" == status ]]; then
      show_status
    else
      stop_run
    fi
    ;;
esac
