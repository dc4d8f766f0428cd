"""`python -m server.tokens --name ci --scopes read,generate`: makes a bearer token and prints
the [[tokens]] table to add to the settings. Only the SHA-256 goes into the settings; the
token itself is shown once."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence

from server.application.security import ALL_SCOPES, token_sha256


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.tokens", description=__doc__)
    parser.add_argument("--name", required=True, help="who the token is for (the principal)")
    parser.add_argument(
        "--scopes", required=True, help=f"comma-separated: {', '.join(sorted(ALL_SCOPES))}"
    )
    args = parser.parse_args(argv)
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = sorted(set(scopes) - ALL_SCOPES)
    if not scopes or unknown:
        parser.error(f"unknown scopes: {', '.join(unknown) or '(none given)'}")
    token = "lor_" + secrets.token_urlsafe(32)
    print(f"token (give it to {args.name}; it is not stored anywhere): {token}", file=sys.stderr)
    print("[[tokens]]")
    print(f'name = "{args.name}"')
    print(f'sha256 = "{token_sha256(token)}"')
    print(f"scopes = [{', '.join(repr(s).replace(chr(39), chr(34)) for s in scopes)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
