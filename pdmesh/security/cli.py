"""`pdmesh certs`: write a private CA and one certificate per identity, or revoke one.

    pdmesh certs --out DIR [--host H ...]        # CA (kept if DIR has one) + coordinator, controller,
                                                 # worker, admin certificates and keys
    pdmesh certs --out DIR --new-ca [--host H]   # a fresh CA and certificates under it
    pdmesh certs --out DIR --revoke IDENTITY     # add IDENTITY's current certificate to DIR/crl.pem

Exit codes: 0 done, 1 the files could not be written or read, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from pdmesh.security.certs import IDENTITIES, revoke, write_certs

PROG = "pdmesh certs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="TLS certificates for pdmesh's services")
    parser.add_argument("--out", required=True, help="directory for ca.pem, <identity>.pem/.key, crl.pem")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the services are reached at (repeatable; localhost and "
        "127.0.0.1 are always in)",
    )
    parser.add_argument(
        "--new-ca", action="store_true", help="replace the CA in --out (all peers need the new one)"
    )
    parser.add_argument(
        "--revoke", metavar="IDENTITY", help=f"revoke this identity's certificate ({', '.join(IDENTITIES)})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out.strip():
        return _fail("--out is empty", 2)
    try:
        if args.revoke:
            if args.host or args.new_ca:
                return _fail("--revoke takes no --host or --new-ca", 2)
            crl = revoke(args.out, args.revoke)
            print(f"revoked {args.revoke}: {crl}")
            return 0
        paths = write_certs(args.out, args.host, new_ca=args.new_ca)
    except ValueError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        if exc.filename is None:  # ours: a missing CA or certificate, named in the message
            return _fail(str(exc), 2)
        return _fail(f"cannot use {exc.filename}: {exc.strerror}", 1)
    print(f"wrote {paths.ca} and the certificates of {', '.join(IDENTITIES)} in {paths.out_dir}")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
