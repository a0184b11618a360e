"""The one exception tree of Tureen.

Every failure a caller can cause or observe is a ``SoupError``. Each subclass carries a
``reason``: a short machine-readable word used as the ``reason`` label of failure metrics
and mapped to a gRPC status code in exactly one place (``tureen.transport.grpc.status``).
The core raises these and never imports grpc.
"""

from __future__ import annotations

from typing import ClassVar


class SoupError(Exception):
    """Base of every error Tureen raises on purpose; the message is meant for humans."""

    reason: ClassVar[str] = "internal"

    def within(self, where: str) -> SoupError:
        """Prefix the message with where it happened (``spec FILE``), once; returns self to re-raise."""
        text = str(self)
        if not text.startswith(f"{where}: "):
            self.args = (f"{where}: {text}",)
        return self


class SpecInvalid(SoupError):
    """A soup spec failed validation; the message names each field and why."""

    reason = "invalid_spec"

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        prefix = f"spec {source}: " if source else ""
        super().__init__(prefix + "; ".join(problems))


class IngredientError(SoupError):
    """An ingredient checkpoint could not be used."""

    reason = "invalid_ingredient"


class IngredientMissing(IngredientError):
    """The checkpoint file does not exist or cannot be read."""

    reason = "ingredient_missing"


class IngredientCorrupt(IngredientError):
    """The file is not a readable state dict, fails its checksum, or holds NaN/Inf."""

    reason = "ingredient_corrupt"


class IngredientChanged(IngredientError):
    """A checkpoint file changed on disk (size, mtime or inode) while it was in use."""

    reason = "ingredient_changed"


class IngredientMismatch(IngredientError):
    """Keys, shapes or dtypes disagree across ingredients or with the architecture."""

    reason = "ingredient_mismatch"


class ArchitectureError(SoupError):
    """The architecture factory cannot be imported, called, or described."""

    reason = "invalid_architecture"


class MergeError(SoupError):
    """A merge method was given inputs it cannot combine."""

    reason = "merge_failed"


class ModelNotFound(SoupError):
    """No model of that name (or no such version of it) is served here."""

    reason = "not_found"


class BlendNotReady(SoupError):
    """The model is configured but its blend is not built yet."""

    reason = "unavailable"


class InvalidRequest(SoupError):
    """A request does not fit: a tensor outside the model's interface, a malformed model name."""

    reason = "invalid_argument"


class RequestTooLarge(InvalidRequest):
    """A request body over the message limit (``--max-message-mb``), refused while it is read."""


class InferenceFailed(SoupError):
    """The blend's forward pass raised; the blend keeps serving other requests."""

    reason = "internal"


class QueueFull(BlendNotReady):
    """The model's batching queue holds ``max_queue_size`` requests already: answered at once,
    never left waiting (Triton's behaviour)."""

    reason = "queue_full"


class DeadlineExceeded(SoupError):
    """The caller's deadline passed while the request waited in the queue: dropped before compute."""

    reason = "deadline_exceeded"


class Cancelled(SoupError):
    """The caller went away (a cancelled call) while the request waited: dropped before compute."""

    reason = "cancelled"


class PermissionDenied(SoupError):
    """The operator's flags do not allow this: a pushed spec naming code or files outside what
    the server was started with, an admin call from a peer outside ``--admin-allow-from``."""

    reason = "permission_denied"


class Unauthenticated(SoupError):
    """A call that needs a bearer token came without the right one."""

    reason = "unauthenticated"


class StoreError(SoupError):
    """The spec store cannot be read or written (a missing or read-only directory, a full disk)."""

    reason = "store_unavailable"


class VersionConflict(SoupError):
    """The request does not fit the version's state: activating a failed version, deleting
    the active one, rolling back with nothing to roll back to."""

    reason = "failed_precondition"


class OutOfMemory(SoupError):
    """The device has no room for another blend beside the ones it holds."""

    reason = "out_of_memory"


class EvaluationError(SoupError):
    """An evaluation set cannot score the model: missing tensors, wrong shapes, labels out of range, empty."""

    reason = "invalid_evaluation"


class EvaluationMissing(EvaluationError):
    """An evaluation file is not on this machine (another replica may have it)."""

    reason = "evaluation_missing"


class GateRejected(VersionConflict):
    """The rollout gate kept a version from serving: its held-out metric is worse than the active one's."""

    reason = "gate_rejected"
