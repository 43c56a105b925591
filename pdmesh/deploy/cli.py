"""`pdmesh deploy`: render manifests from a cluster file, and the small commands containers run.

    pdmesh deploy render --config FILE --target compose|k8s --out DIR
    pdmesh deploy check --config FILE           validate; print what would run
    pdmesh deploy probe grpc HOST:PORT [--service NAME] | http URL | self   (health checks)
    pdmesh deploy drain [--controller ADDR] [--instance-id ID] [--timeout-s N]   (preStop hook)

Exit codes: 0 done, 1 a probe or drain failed, 2 bad input (one line naming the problem).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

PROG = "pdmesh deploy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="deploy pdmesh from a cluster file")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write docker-compose or Kubernetes manifests")
    render.add_argument("--config", type=Path, required=True, help="the cluster file (JSON or YAML)")
    render.add_argument("--target", choices=["compose", "k8s"], required=True)
    render.add_argument("--out", type=Path, required=True, help="output directory (created)")
    check = sub.add_parser("check", help="validate a cluster file and print what it deploys")
    check.add_argument("--config", type=Path, required=True)
    probe = sub.add_parser("probe", help="exit 0 while a service is healthy (container health checks)")
    probe.add_argument("kind", choices=["grpc", "http", "self"], help="self: this container's service")
    probe.add_argument("target", nargs="?", default="", help="host:port (grpc) or a URL (http)")
    probe.add_argument("--service", default="", help="grpc: the health service name ('' overall)")
    probe.add_argument("--timeout-s", type=float, default=3.0)
    probe.add_argument("--cacert", default=None, help="http: the CA of an https URL (default: not checked)")
    drain = sub.add_parser("drain", help="take this worker offline and wait until its work is done")
    drain.add_argument("--controller", default=os.environ.get("PDMESH_WORKER_CONTROLLER", ""))
    drain.add_argument("--instance-id", default=os.environ.get("PDMESH_WORKER_INSTANCE_ID", ""))
    drain.add_argument("--timeout-s", type=float, default=60.0)
    for command in (probe, drain):  # mutual TLS: the container's own certificate
        for kind in ("ca", "cert", "key", "crl"):
            command.add_argument(f"--tls-{kind}", default=None, help=f"grpc with mutual TLS: {kind} (PEM)")
    return parser


def _configure_tls(args: argparse.Namespace) -> None:
    """Presents the given certificate on this process's gRPC channels (TlsError when a file is bad)."""
    from pdmesh.security import tls

    if args.tls_cert:
        tls.configure(tls.TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, crl=args.tls_crl))


def cmd_render(args: argparse.Namespace) -> int:
    from pdmesh.deploy.render import render_to

    written = render_to(args.config, args.target, args.out)
    print(f"wrote {len(written)} files to {args.out}: {', '.join(p.name for p in written)}")
    for line in tls_notes(args.config, args.target):
        print(line)
    return 0


def tls_notes(config: Path, target: str) -> list[str]:
    """What the user does with ``tls_config`` before applying: certificates naming the services'
    host names, and on Kubernetes the Secret the pods mount."""
    from pdmesh.deploy.cluster_file import load_cluster_file
    from pdmesh.deploy.tls_config import secret_command
    from pdmesh.deploy.tls_render import cert_hosts

    cluster = load_cluster_file(config)
    tls, notes = cluster.tls_config, []
    if tls.management_tls_enable:
        hosts = " ".join(f"--host '{h}'" for h in cert_hosts(cluster, target))
        notes.append(f"certificates must name the services: pdmesh certs --out DIR {hosts}")
    command = secret_command(tls, cluster.deploy_config.namespace, cluster.coordinator.api_key_file)
    if target == "k8s" and command:
        notes.append(f"create the Secret the pods mount first: {command}")
    return notes


def cmd_check(args: argparse.Namespace) -> int:
    from pdmesh.deploy.cluster_file import load_cluster_file

    cluster = load_cluster_file(args.config)
    for role in ("prefill", "decode"):
        s = cluster.server(role)
        print(
            f"{role}: {cluster.instances(role)} instances x {cluster.pods(role)} pods x "
            f"{cluster.devices_per_pod(role)} {s.device} devices (tp {s.tp}, dp {s.dp}, "
            f"moe_ep {s.moe_ep}, moe_tp {s.moe_tp})"
        )
    print(f"controllers: {cluster.controller.replicas}, ratio {cluster.controller.pd_ratio}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    if args.kind == "self":
        try:
            cmdline = Path("/proc/1/cmdline").read_bytes().split(b"\0")
            args.kind, args.target = self_target(cmdline)
            _self_tls(args, [a.decode(errors="replace") for a in cmdline if a])
        except ValueError as exc:
            print(f"{PROG} probe self: {exc}", file=sys.stderr)
            return 1
    if not args.target:
        print(f"{PROG} probe: name the target (host:port or a URL)", file=sys.stderr)
        return 2
    if args.kind == "http":
        import httpx

        # a container's health check of its own port: without --cacert, https is not verified
        verify = args.cacert or not args.target.startswith("https://")
        try:
            code = httpx.get(args.target, timeout=args.timeout_s, verify=verify).status_code
        except httpx.HTTPError as exc:
            print(f"{PROG} probe: {args.target}: {exc!r}", file=sys.stderr)
            return 1
        if code != 200:
            print(f"{PROG} probe: {args.target} answered {code}", file=sys.stderr)
        return 0 if code == 200 else 1
    _configure_tls(args)
    return asyncio.run(_grpc_probe(args.target, args.service, args.timeout_s))


def _self_tls(args: argparse.Namespace, argv: list[str]) -> None:
    """``probe self``: the service's own ``--tls-*`` files (and CA for its HTTPS), unless given."""
    for kind in ("ca", "cert", "key", "crl"):
        flag = f"--tls-{kind}"
        if getattr(args, f"tls_{kind}") is None and flag in argv[:-1]:
            setattr(args, f"tls_{kind}", argv[argv.index(flag) + 1])
    if "--http-tls-cert" in argv[:-1]:
        args.target = args.target.replace("http://", "https://", 1)


def self_target(cmdline: list[bytes]) -> tuple[str, str]:
    """(kind, target) that checks the service a container runs, from its command line
    (``pdmesh controller --port 50051 ...``); ValueError when it is none of pdmesh's services."""
    argv = [a.decode(errors="replace") for a in cmdline if a]
    service = next((a for a in argv if a in ("controller", "coordinator") or a.endswith("-worker")), None)
    if service is None:
        raise ValueError(f"not a pdmesh service: {' '.join(argv)[:200]!r}")

    def flag(name: str, default: str) -> str:
        return argv[argv.index(name) + 1] if name in argv[:-1] else default

    host = flag("--host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if service == "coordinator":
        return "http", f"http://{host}:{flag('--http-port', '8000')}/health"
    port = flag("--port", "")
    if not port or port == "0":
        raise ValueError(f"{service} runs without a fixed --port: nothing to probe")
    return "grpc", f"{host}:{port}"


async def _grpc_probe(address: str, service: str, timeout_s: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdmesh.rpc.client import open_channel

    async with open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            print(f"{PROG} probe: {address}: {exc.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{PROG} probe: {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        return 1
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain at the controller, then wait until the instance reports no work (or the time is up):
    coordinators stop sending it requests, and what it runs finishes before SIGTERM."""
    if not args.controller or not args.instance_id:
        print(
            f"{PROG} drain: need --controller and --instance-id (or the worker's environment)",
            file=sys.stderr,
        )
        return 2
    _configure_tls(args)
    return asyncio.run(_drain(args.controller, args.instance_id, args.timeout_s))


async def _drain(controller: str, instance_id: str, timeout_s: float) -> int:
    from pdmesh.rpc.controller_endpoints import ControllerEndpoints
    from pdmesh.rpc.convert_cluster import instance_from_proto
    from pdmesh.v1 import controller_pb2
    from services.controller.ctl import CtlError, call

    endpoints = ControllerEndpoints(controller)
    deadline = time.monotonic() + timeout_s
    try:
        await call(endpoints, "Drain", controller_pb2.DrainRequest(instance_id=instance_id), timeout_s)
        while time.monotonic() < deadline:
            reply = await call(endpoints, "ListInstances", controller_pb2.ListInstancesRequest(), 5.0)
            mine = [instance_from_proto(m) for m in reply.instances if m.instance_id == instance_id]
            if not mine or mine[0].load.idle():
                print(f"{instance_id} drained")
                return 0
            await asyncio.sleep(0.5)
    except CtlError as exc:
        print(f"{PROG} drain: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG} drain: {instance_id} still busy after {timeout_s:.0f}s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    handler = {"render": cmd_render, "check": cmd_check, "probe": cmd_probe, "drain": cmd_drain}
    try:
        return handler[args.command](args)
    except ValueError as exc:  # ClusterFileError, or a TLS file (TlsError) that cannot be used
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
