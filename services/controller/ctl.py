"""`pdmesh ctl`: administer the controller over gRPC (follows the active one among several).

    pdmesh ctl --controller HOST:PORT[,HOST:PORT...] list
    pdmesh ctl --controller ... set-ratio 2:1|auto|off
    pdmesh ctl --controller ... drain ID | undrain ID
    pdmesh ctl --controller ... flip ID prefill|decode|mixed
    pdmesh ctl --controller ... top [--coordinator URL] [--interval-s 2] [--once]
    pdmesh ctl experts [METRICS] [--rebalance WORKER]   (the worker itself, no controller)

With mutual TLS on the controller: --tls-ca CA --tls-cert admin.pem --tls-key admin.key (or
PDMESH_CTL_TLS_CA/_CERT/_KEY); the admin methods need the ``admin`` identity.

Exit codes: 0 done, 1 the controller refused or could not be reached, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from pdmesh.membership import Role
from pdmesh.observability.top import TopError, check_coordinator_url, parse_interval, run_top
from pdmesh.rpc.client import open_channel
from pdmesh.rpc.controller_endpoints import ControllerEndpoints
from pdmesh.rpc.convert_cluster import instance_from_proto, role_to_proto
from pdmesh.security import tls
from pdmesh.v1 import controller_pb2, controller_pb2_grpc
from services.controller import ctl_experts
from services.controller.ratio import parse_ratio

PROG = "pdmesh ctl"


class CtlError(Exception):
    """A one-line error for the user, with the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="administer the pdmesh controller")
    parser.add_argument(
        "--controller",
        default=os.environ.get("PDMESH_CONTROLLER", ""),
        help="controller address(es) host:port[,host:port]; default: $PDMESH_CONTROLLER",
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of the call (flips wait)")
    for name, what in (
        ("ca", "the CA bundle"),
        ("cert", "the admin certificate"),
        ("key", "its private key"),
    ):
        parser.add_argument(
            f"--tls-{name}",
            default=os.environ.get(f"PDMESH_CTL_TLS_{name.upper()}"),
            help=f"mutual TLS: {what} (PEM); default: $PDMESH_CTL_TLS_{name.upper()}",
        )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="instances, roles, states and loads")
    sub.add_parser("set-ratio", help="target P:D ratio").add_argument(
        "ratio", help="P:D (e.g. 2:1), auto or off"
    )
    sub.add_parser("drain", help="take an instance offline").add_argument("instance_id")
    sub.add_parser("undrain", help="put a drained instance back online").add_argument("instance_id")
    flip = sub.add_parser("flip", help="drain an instance, switch its role, put it back online")
    flip.add_argument("instance_id")
    flip.add_argument("role", help="prefill, decode or mixed")
    ctl_experts.add_parser(sub)
    top = sub.add_parser("top", help="live view: instances, loads, ratio; latency with --coordinator")
    top.add_argument(
        "--coordinator",
        default=os.environ.get("PDMESH_COORDINATOR_URL", ""),
        help="coordinator HTTP URL (its /dashboard/data: latency, requests/s); default: $PDMESH_COORDINATOR_URL",
    )
    top.add_argument("--interval-s", default="2", help="seconds between frames (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    return parser


def request_for(args: argparse.Namespace) -> tuple[str, object]:
    """(RPC name, request) for the parsed command; CtlError(code 2) for bad input."""
    if args.command == "list":
        return "ListInstances", controller_pb2.ListInstancesRequest()
    if args.command == "set-ratio":
        try:
            parse_ratio(args.ratio)
        except ValueError as exc:
            raise CtlError(str(exc), 2) from None
        return "SetRatio", controller_pb2.SetRatioRequest(ratio=args.ratio)
    if not args.instance_id.strip():
        raise CtlError("instance id is empty", 2)
    if args.command == "flip":
        try:
            role = Role(args.role.lower())
        except ValueError:
            raise CtlError(f"bad role {args.role!r}: want prefill, decode or mixed", 2) from None
        return "FlipRole", controller_pb2.FlipRoleRequest(
            instance_id=args.instance_id, role=role_to_proto(role)
        )
    method = "Drain" if args.command == "drain" else "Undrain"
    return method, controller_pb2.DrainRequest(instance_id=args.instance_id)


def tls_files(args: argparse.Namespace) -> tls.TlsFiles | None:
    """The TLS files of --tls-ca/--tls-cert/--tls-key (all three or none); CtlError(code 2) else."""
    given = {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise CtlError(
            f"mutual TLS needs --tls-ca, --tls-cert and --tls-key; missing {', '.join(missing)}", 2
        )
    files = tls.TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    try:
        files.load()
    except tls.TlsError as exc:
        raise CtlError(str(exc), 2) from None
    return files


async def call(endpoints: ControllerEndpoints, method: str, request, timeout_s: float):
    """Calls ``method`` at the active controller, following standbys' redirects (a few hops)."""
    last: grpc.aio.AioRpcError | None = None
    for _ in range(2 * len(endpoints.addresses) + 1):
        async with open_channel(endpoints.current) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            try:
                return await getattr(stub, method)(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                last = exc
                movable = exc.code() == grpc.StatusCode.UNAVAILABLE or endpoints.is_standby_refusal(exc)
                if not movable or not endpoints.follow(exc):
                    break
    code = 2 if last.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    raise CtlError(f"{method} at {endpoints.current}: {last.code().name}: {last.details()}", code)


def render(method: str, reply) -> str:
    """What the command prints."""
    if method == "ListInstances":
        lines = [f"active {reply.active or '-'} (fencing token {reply.fencing_token}), ratio {reply.ratio}"]
        if reply.demand:
            lines.append(f"demand: {reply.demand}")
        lines.append(f"{'ID':<20} {'ROLE':<8} {'STATE':<9} {'ADDRESS':<22} RUN WAIT KV-FREE")
        for msg in reply.instances:
            i = instance_from_proto(msg)
            load = i.load
            figures = (
                f"{'?':>3} {'?':>4} ?  (load unknown)"
                if load.unknown
                else f"{load.running:>3} {load.waiting:>4} {load.free_blocks}/{load.total_blocks}"
            )
            lines.append(
                f"{i.instance_id:<20} {i.role.value:<8} {i.state.value:<9} {i.address:<22} {figures}"
            )
        return "\n".join(lines)
    if method == "SetRatio":
        return f"ratio {reply.ratio}"
    info = instance_from_proto(reply.instance)
    return f"{info.instance_id}: {info.role.value} {info.state.value}"


def top(args: argparse.Namespace, endpoints: ControllerEndpoints) -> int:
    """`pdmesh ctl top`: frames until Ctrl-C (exit 0), or one with --once; CtlError on bad input or
    when the first frame's sources fail."""
    try:
        interval_s = parse_interval(args.interval_s)
        coordinator = check_coordinator_url(args.coordinator) if args.coordinator else None
        request = controller_pb2.ListInstancesRequest()
        timeout_s = min(args.timeout_s, max(interval_s, 5.0))

        def list_instances():
            return call(endpoints, "ListInstances", request, timeout_s)

        return asyncio.run(run_top(list_instances, coordinator, interval_s, args.once))
    except TopError as exc:
        raise CtlError(str(exc), exc.code) from None
    except KeyboardInterrupt:  # Ctrl-C is how a live view ends
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "experts":  # the worker itself, no controller involved
        try:
            print(ctl_experts.run(args, tls_files(args), args.timeout_s))
        except (ctl_experts.ExpertsError, CtlError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return exc.code
        return 0
    try:
        if not args.controller:
            raise CtlError("--controller is required (or set PDMESH_CONTROLLER)", 2)
        try:
            endpoints = ControllerEndpoints(args.controller)
        except ValueError as exc:
            raise CtlError(str(exc), 2) from None
        tls.configure(tls_files(args))  # open_channel then presents the certificate
        if args.command == "top":
            return top(args, endpoints)
        method, request = request_for(args)
        reply = asyncio.run(call(endpoints, method, request, args.timeout_s))
    except CtlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    print(render(method, reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
