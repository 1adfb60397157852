"""The control plane: Modal's ``ModalClient`` service, the part of it sandboxes use.

Apps, the environment's image-builder version, images and mounts, secrets, auth tokens and the
``*V2`` sandbox RPCs. Every other RPC of the service answers UNIMPLEMENTED and is recorded
(``rpc.strict``). Every call must carry the token the stand-in gave out (UNAUTHENTICATED
otherwise), as Modal's API refuses unknown credentials.
"""

from __future__ import annotations

import asyncio
import contextlib

from google.protobuf.empty_pb2 import Empty
from grpclib import GRPCError, Status
from modal_proto import api_grpc, api_pb2

from .images import BUILDER_VERSION
from .rpc import invalid, not_found, strict, unary
from .state import State

#: Builder versions the client may ask for; a real server refuses versions it does not know.
KNOWN_BUILDER_VERSIONS = {"2023.12", "2024.04", "2024.10", "2025.06"}
Creation = api_pb2.ObjectCreationType


@strict(api_grpc.ModalClientBase)
class ControlPlane(api_grpc.ModalClientBase):
    def __init__(self, state: State) -> None:
        self.state = state
        self.recorder = state.recorder

    def __mapping__(self):
        """Every call is checked for the client's token before its handler runs."""
        mapping = super().__mapping__()
        for path, handler in mapping.items():
            mapping[path] = handler._replace(func=self._authenticated(handler.func))
        return mapping

    def _authenticated(self, func):
        async def check(stream):
            try:
                self.state.check_token(stream.metadata)
            except GRPCError:
                self.recorder.call(f"unauthenticated:{func.__name__}")
                raise
            await func(stream)

        return check

    # -- auth, apps, environment ------------------------------------------------------------------

    @unary
    async def AuthTokenGet(self, request, stream):
        return api_pb2.AuthTokenGetResponse(token=self.state.jwt({"sub": self.state.options.token_id}))

    @unary
    async def AppGetOrCreate(self, request, stream):
        if not request.app_name:
            raise invalid("App name is required")
        create = request.object_creation_type in (
            Creation.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            Creation.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
        )
        app_id = self.state.app(request.environment_name, request.app_name, create)
        return api_pb2.AppGetOrCreateResponse(app_id=app_id)

    @unary
    async def EnvironmentGetOrCreate(self, request, stream):
        if request.deployment_name not in ("", "main"):
            raise not_found(f"Environment '{request.deployment_name}'")
        return api_pb2.EnvironmentGetOrCreateResponse(
            environment_id="en-main",
            metadata=api_pb2.EnvironmentMetadata(
                name="main", settings=api_pb2.EnvironmentSettings(image_builder_version=BUILDER_VERSION)
            ),
        )

    # -- images and mounts ------------------------------------------------------------------------

    @unary
    async def ImageGetOrCreate(self, request, stream):
        if request.builder_version and request.builder_version not in KNOWN_BUILDER_VERSIONS:
            raise invalid(f"Unknown image builder version {request.builder_version!r}")
        if request.image.HasField("build_function") or request.build_function_id:
            self.recorder.missing("ImageGetOrCreate.build_function")
            raise GRPCError(Status.UNIMPLEMENTED, "the modal stand-in does not run image build functions")
        image = await asyncio.to_thread(self.state.store.get_or_create, request.image)
        return api_pb2.ImageGetOrCreateResponse(
            image_id=image.image_id,
            result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
            metadata=image.metadata(),
        )

    @unary
    async def ImageFromId(self, request, stream):
        image = self.state.store.get(request.image_id)
        return api_pb2.ImageFromIdResponse(image_id=image.image_id, metadata=image.metadata())

    @unary
    async def ImageDelete(self, request, stream):
        """``modal.experimental.image_delete``: the image is gone from then on, as one past its
        TTL (``Image.from_id`` answers NOT_FOUND); deleting an unknown (or deleted) image is
        NOT_FOUND too. Its files stay on disk: the stand-in's running sandboxes are copies."""
        with self.state.store._lock:
            if self.state.store.images.pop(request.image_id, None) is None:
                raise not_found(f"Image {request.image_id}")
        return Empty()

    @unary
    async def MountBatchedCheckExistence(self, request, stream):
        missing = [h for h in request.sha256_hex_hashes if h not in self.state.store.blobs]
        return api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)

    @unary
    async def MountPutFile(self, request, stream):
        if request.WhichOneof("data_oneof") != "data":
            self.recorder.missing("MountPutFile.data_blob_id")
            raise GRPCError(Status.UNIMPLEMENTED, "the modal stand-in takes files inline only (< 4 MiB)")
        self.state.store.put_blob(request.sha256_hex, request.data)
        return api_pb2.MountPutFileResponse(exists=True)

    @unary
    async def MountGetOrCreate(self, request, stream):
        mount = self.state.store.create_mount(list(request.files))
        return api_pb2.MountGetOrCreateResponse(mount_id=mount.mount_id)

    # -- secrets ----------------------------------------------------------------------------------

    @unary
    async def SecretGetOrCreate(self, request, stream):
        store = self.state.store
        environment = request.environment_name or "main"
        kind = request.object_creation_type
        if kind == Creation.OBJECT_CREATION_TYPE_EPHEMERAL:
            return api_pb2.SecretGetOrCreateResponse(secret_id=store.add_secret(dict(request.env_dict)))
        if not request.deployment_name:
            raise invalid("Secret name is required")
        existing = store.secret_names.get((environment, request.deployment_name))
        if kind == Creation.OBJECT_CREATION_TYPE_UNSPECIFIED:
            if existing is None:
                raise not_found(f"Secret '{request.deployment_name}'")
            env = store.secret(existing)
            missing = [k for k in request.required_keys if k not in env]
            if missing:
                raise GRPCError(Status.NOT_FOUND, f"Secret is missing key(s): {', '.join(missing)}")
            return api_pb2.SecretGetOrCreateResponse(secret_id=existing)
        if existing is not None and kind == Creation.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
            raise GRPCError(Status.ALREADY_EXISTS, f"Secret '{request.deployment_name}' already exists")
        if existing is not None and kind == Creation.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
            return api_pb2.SecretGetOrCreateResponse(secret_id=existing)
        secret_id = store.add_secret(dict(request.env_dict), request.deployment_name, environment)
        return api_pb2.SecretGetOrCreateResponse(secret_id=secret_id)

    # -- sandboxes --------------------------------------------------------------------------------

    @unary
    async def SandboxCreateV2(self, request, stream):
        sandbox = await self.state.create(request)
        return api_pb2.SandboxCreateV2Response(
            sandbox_id=sandbox.sandbox_id,
            task_id=sandbox.task_id,
            tunnels=tunnel_protos(sandbox),
            metadata=sandbox.handle_metadata(),
            command_router_access=self.state.router_access(sandbox),
        )

    @unary
    async def SandboxGetTaskIdV2(self, request, stream):
        sandbox = self.state.sandbox(request.sandbox_id)
        if not sandbox.running:
            return api_pb2.SandboxGetTaskIdResponse(task_result=sandbox.result)
        return api_pb2.SandboxGetTaskIdResponse(task_id=sandbox.task_id)

    @unary
    async def SandboxGetCommandRouterAccess(self, request, stream):
        sandbox = self.state.by_task.get(request.task_id)
        if request.sandbox_id:
            sandbox = self.state.sandbox(request.sandbox_id)
        elif sandbox is None:
            raise not_found(f"Task {request.task_id}")
        if not sandbox.running:
            raise GRPCError(Status.FAILED_PRECONDITION, f"Sandbox {sandbox.sandbox_id} has already finished")
        access = self.state.router_access(sandbox)
        return api_pb2.SandboxGetCommandRouterAccessResponse(url=access.url, jwt=access.jwt)

    @unary
    async def SandboxGetTunnelsV2(self, request, stream):
        sandbox = self.state.sandbox(request.sandbox_id)
        if not sandbox.running:
            raise GRPCError(Status.FAILED_PRECONDITION, f"Sandbox {sandbox.sandbox_id} has already finished")
        return api_pb2.SandboxGetTunnelsResponse(
            result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
            tunnels=tunnel_protos(sandbox),
        )

    @unary
    async def SandboxWaitV2(self, request, stream):
        """Answers within ``timeout`` (0: at once) with the result, or an empty one while running."""
        sandbox = self.state.sandbox(request.sandbox_id)
        if sandbox.running and request.timeout > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sandbox.ended.wait(), timeout=min(request.timeout, 55))
        return api_pb2.SandboxWaitResponse(result=sandbox.result, metadata=sandbox.handle_metadata())

    @unary
    async def SandboxTerminateV2(self, request, stream):
        sandbox = self.state.sandbox(request.sandbox_id)
        existing = sandbox.result
        await self.state.terminate(sandbox)
        return api_pb2.SandboxTerminateResponse(existing_result=existing)

    @unary
    async def SandboxListV2(self, request, stream):
        page = self.state.list_page(request)
        return api_pb2.SandboxListResponse(sandboxes=[s.info() for s in page])

    @unary
    async def SandboxTagsGetV2(self, request, stream):
        sandbox = self.state.sandbox(request.sandbox_id)
        return api_pb2.SandboxTagsGetResponse(
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()]
        )

    @unary
    async def SandboxTagsSetV2(self, request, stream):
        sandbox = self.state.sandbox(request.sandbox_id)
        sandbox.tags = {t.tag_name: t.tag_value for t in request.tags}
        return Empty()

    @unary
    async def SandboxGetFromNameV2(self, request, stream):
        app_id = self.state.app(request.environment_name, request.app_name, create=False)
        for sandbox in self.state.sandboxes.values():
            named = sandbox.definition.name == request.sandbox_name
            if sandbox.app_id == app_id and named and sandbox.running:
                return api_pb2.SandboxGetFromNameResponse(
                    sandbox_id=sandbox.sandbox_id, metadata=sandbox.handle_metadata()
                )
        raise not_found(f"Sandbox with name '{request.sandbox_name}'")


def tunnel_protos(sandbox) -> list[api_pb2.TunnelData]:
    return [
        api_pb2.TunnelData(host=host, port=port, container_port=container_port)
        for container_port, (host, port) in sandbox.tunnels.items()
    ]
