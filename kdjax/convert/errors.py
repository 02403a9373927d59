"""Errors raised when a PyTorch checkpoint cannot be imported."""

from __future__ import annotations

Shape = tuple[int, ...]


class TorchCheckpointError(ValueError):
    """A PyTorch checkpoint that cannot be read or does not fit the requested model."""


class CheckpointMismatchError(TorchCheckpointError):
    """The state dict's keys or shapes differ from the model's; nothing was loaded.

    Attributes (keys and shapes in PyTorch's naming and OIHW layout):
      missing: key → shape the model expects, for keys the checkpoint lacks.
      unexpected: key → shape in the checkpoint, for keys the model has no place for.
      mismatched: key → (checkpoint shape, expected shape).
    """

    def __init__(self, model: str, missing: dict[str, Shape], unexpected: dict[str, Shape],
                 mismatched: dict[str, tuple[Shape, Shape]], hints: tuple[str, ...] = ()):
        self.model = model
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"the state dict does not fit {model}; nothing was loaded."]
        sections = (
            ("missing key", {k: f"expected {shape}" for k, shape in missing.items()}),
            ("unexpected key", {k: f"{shape}" for k, shape in unexpected.items()}),
            ("mis-shaped key", {k: f"checkpoint {got}, model expects {want}"
                                for k, (got, want) in mismatched.items()}),
        )
        for title, entries in sections:
            if entries:
                lines.append(f"{len(entries)} {title}{'s' if len(entries) > 1 else ''}:")
                lines += [f"  {key}: {text}" for key, text in entries.items()]
        lines += list(hints)
        super().__init__("\n".join(lines))
