"""The operator API (``tureen.v1.SoupAdmin``): decode, delegate to the controller, encode."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import grpc

from tureen.core.controller import Controller
from tureen.core.ingredients import IngredientPool
from tureen.core.rollout import Feedback
from tureen.core.status import ModelStatus
from tureen.core.store import StoredVersion
from tureen.errors import InvalidRequest
from tureen.spec import spec_document, spec_from_json
from tureen.v1 import admin_pb2 as pb
from tureen.v1 import admin_pb2_grpc

WATCH_HEARTBEAT_S = 15.0
"""A watch re-sends the status at least this often, so a client can tell the stream is alive."""


def encode_version(stored: StoredVersion, state: str | None = None) -> pb.VersionInfo:
    return pb.VersionInfo(
        model=stored.model,
        version=stored.version,
        state=state or stored.state,
        reason=stored.reason,
        pushed_by=stored.pushed_by,
        pushed_at=stored.pushed_at,
        build_seconds=stored.build_seconds or 0.0,
        checksums=stored.checksums,
        evaluation={split: pb.Scores(metrics=values) for split, values in stored.evaluation.items()},
        ingredient_evaluation=[
            pb.IngredientScores(ingredient=name, splits={split: pb.Scores(metrics=v) for split, v in by_split.items()})
            for name, by_split in stored.ingredient_evaluation.items()
        ],
        resolution_json=json.dumps(stored.resolution) if stored.resolution is not None else "",
    )


def _peer_user(request_user: str, context: grpc.ServicerContext) -> str:
    return request_user or context.peer()


class AdminServicer(admin_pb2_grpc.SoupAdminServicer):
    def __init__(self, controller: Controller, pool: IngredientPool) -> None:
        self._controller = controller
        self._pool = pool

    def PushSpec(self, request: pb.PushSpecRequest, context: grpc.ServicerContext) -> pb.VersionReply:
        spec = spec_from_json(request.spec_json, "spec_json")
        activate = request.activate if request.HasField("activate") else True
        who = _peer_user(request.pushed_by, context)
        stored = self._controller.push(spec, who, activate=activate, wait=request.wait, in_place=request.in_place)
        return pb.VersionReply(version=encode_version(stored, self._controller.state_of(stored)))

    def GetSpec(self, request: pb.GetSpecRequest, context: grpc.ServicerContext) -> pb.GetSpecReply:
        stored = self._controller.spec(request.model, request.version or None)
        return pb.GetSpecReply(
            version=encode_version(stored, self._controller.state_of(stored)), spec_json=json.dumps(spec_document(stored.spec))
        )

    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext) -> pb.ListVersionsReply:
        shown = self._controller.versions(request.model)
        return pb.ListVersionsReply(versions=[encode_version(stored, state) for stored, state in shown])

    def Activate(self, request: pb.ActivateRequest, context: grpc.ServicerContext) -> pb.VersionReply:
        stored = self._controller.activate(request.model, request.version, _peer_user("", context))
        return pb.VersionReply(version=encode_version(stored, "active"))

    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.VersionReply:
        stored = self._controller.rollback(request.model, _peer_user("", context), to=request.to_version or None)
        return pb.VersionReply(version=encode_version(stored, "active"))

    def DeleteVersion(self, request: pb.DeleteVersionRequest, context: grpc.ServicerContext) -> pb.DeleteVersionReply:
        self._controller.delete(request.model, request.version)
        return pb.DeleteVersionReply()

    def PromoteCanary(self, request: pb.CanaryRequest, context: grpc.ServicerContext) -> pb.VersionReply:
        stored = self._controller.promote_canary(request.model, _peer_user("", context))
        return pb.VersionReply(version=encode_version(stored, "active"))

    def AbortCanary(self, request: pb.CanaryRequest, context: grpc.ServicerContext) -> pb.VersionReply:
        stored = self._controller.abort_canary(request.model, _peer_user("", context))
        return pb.VersionReply(version=encode_version(stored, self._controller.state_of(stored)))

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusReply:
        return self._status(request.model)

    def WatchStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> Iterator[pb.GetStatusReply]:
        changes = self._controller.changes
        seen = changes.generation
        ended = threading.Event()

        def end(*_: object) -> None:  # the call ended (a cancelled watch, too): stop waiting at once
            ended.set()
            changes.bump()

        context.add_callback(end)
        yield self._status(request.model)
        while not ended.is_set():
            seen = changes.wait(seen, WATCH_HEARTBEAT_S)
            if ended.is_set():
                return
            yield self._status(request.model)

    def _status(self, model: str) -> pb.GetStatusReply:
        statuses = [s for s in self._controller.status() if not model or s.model == model]
        if model and not statuses:
            self._controller.spec(model)  # raises the not-found error naming the model
        return pb.GetStatusReply(
            models=[_encode_status(s) for s in statuses],
            device=str(self._pool.device),
            ingredient_bytes=self._pool.nbytes,
            ingredient_bytes_by_placement=self._pool.bytes_by_placement(),
        )


def _encode_status(status: ModelStatus) -> pb.ModelStatus:
    message = pb.ModelStatus(
        model=status.model,
        active_version=status.active or 0,
        resident_versions=list(status.resident),
        active_bytes=status.active_bytes,
        resident_bytes=status.resident_bytes,
        canary_version=status.canary,
        canary_percent=status.canary_percent,
        online={v: pb.Online(accuracy=acc, samples=n) for v, (acc, n) in status.online.items()},
        canary_note=status.canary_note,
        placement=status.placement,
    )
    if status.building is not None:
        b = status.building
        message.building.CopyFrom(pb.BuildProgress(version=b.version, stage=b.stage, fraction=b.fraction, started_at=b.started))
    return message


class FeedbackServicer(admin_pb2_grpc.SoupFeedbackServicer):
    """Applications report true labels or rewards by request id; the controller scores and decides canaries."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackReply:
        if request.thumbs not in (pb.THUMBS_UNSPECIFIED, pb.THUMBS_UP, pb.THUMBS_DOWN):
            raise InvalidRequest(f"thumbs: {request.thumbs} is not THUMBS_UP (1) or THUMBS_DOWN (2)")
        thumbs = {pb.THUMBS_UP: True, pb.THUMBS_DOWN: False}.get(request.thumbs)
        score = request.score if request.HasField("score") else None
        feedback = Feedback(labels=tuple(request.labels), score=score, thumbs=thumbs)
        version = self._controller.feedback(request.model, request.request_id, feedback)
        return pb.FeedbackReply(matched=version is not None, version=version or 0)
