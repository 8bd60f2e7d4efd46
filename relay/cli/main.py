"""The `relay` command line: argument parsing only; each command lives in its module.

`relay serve`, `relay config check`, `relay queue …`, `relay check DOMAIN`,
`relay tlsrpt show|send --now`, `relay passwd`. Every subcommand takes `-c FILE` (also
after its own arguments); `RELAY_CONFIG=FILE` names the file too. Errors are one clear
line on stderr, exit 2 for usage/config errors, 1 for "not found"/"not allowed" results.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from relay import __version__
from relay import config as configmod
from relay.errors import RelayError


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", metavar="FILE", help="config file (default config/relay.toml)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    ap = argparse.ArgumentParser(
        prog="relay", description="dane-relay: a DANE-enforcing SMTP relay"
    )
    ap.add_argument("--version", action="version", version=f"dane-relay {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the listener and delivery")
    serve.add_argument("--log-format", choices=["json", "text"], help="override log.format")

    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cfg_sub.add_parser("check", parents=[common], help="print the effective config or the error")

    q = sub.add_parser("queue", help="inspect and change the queue")
    q_sub = q.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")
    ql = q_sub.add_parser("list", parents=[common], help="list queued messages (like mailq)")
    ql.add_argument("--all", action="store_true", help="include finished messages")
    ql.add_argument("--json", action="store_true")
    ql.add_argument("--status", choices=["queued", "deferred", "delivered", "bounced"])
    ql.add_argument("--domain", help="recipient domain")
    ql.add_argument("--code", help="enhanced status code, e.g. 4.7.323")
    ql.add_argument("--sender")
    ql.add_argument("--recipient")
    ql.add_argument("--limit", type=int, metavar="N",
                    help="at most N messages (default: all, streamed page by page)")
    ql.add_argument("--after", metavar="ID",
                    help="start after this queue id (the next page of a --limit)")
    qs = q_sub.add_parser("show", parents=[common], help="one message with its delivery trace")
    qs.add_argument("id")
    qs.add_argument("--json", action="store_true")
    qr = q_sub.add_parser("retry", parents=[common], help="make deferred work due now")
    target = qr.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all", action="store_true")
    for name, text in (("delete", "delete a message"), ("hold", "hold a message"),
                       ("release", "release a held message")):
        p = q_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
    qst = q_sub.add_parser("stats", parents=[common], help="counts by status and code")
    qst.add_argument("--json", action="store_true")
    qb = q_sub.add_parser("backup", parents=[common], help="online backup of the queue database")
    qb.add_argument("file")
    qi = q_sub.add_parser("import", parents=[common],
                          help="move the mail of a SQLite queue file into the configured queue")
    qi.add_argument("file")
    qi.add_argument("--json", action="store_true")
    qn = q_sub.add_parser("nodes", parents=[common], help="relay nodes sharing this queue")
    qn.add_argument("--json", action="store_true")

    chk = sub.add_parser("check", parents=[common], help="DANE check of a destination domain")
    chk.add_argument("domain")
    chk.add_argument("--json", action="store_true")
    chk.add_argument("--no-connect", action="store_true", help="DNS checks only")

    hl = sub.add_parser("health", parents=[common],
                        help="check listener, queue database and resolver (exit 0 = healthy)")
    hl.add_argument("--json", action="store_true")

    tr = sub.add_parser("tlsrpt", help="SMTP TLS reporting (RFC 8460)")
    tr_sub = tr.add_subparsers(dest="tlsrpt_command", required=True, metavar="SUBCOMMAND")
    trs = tr_sub.add_parser("show", parents=[common],
                            help="what has been recorded in the current period")
    trs.add_argument("--json", action="store_true")
    trn = tr_sub.add_parser("send", parents=[common],
                            help="end the current period and send its reports now")
    trn.add_argument("--now", action="store_true", required=True,
                     help="end the period now and send without the random delay")
    trn.add_argument("--json", action="store_true")

    pw = sub.add_parser("passwd", parents=[common],
                        help="print a users-file line for listener.users_file")
    pw.add_argument("user")
    return ap


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(getattr(args, "config", None))


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(json.dumps(configmod.dump(cfg), indent=2))
    return 0


def _dispatch(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    if args.command == "serve":
        from relay.app import cmd_serve

        return cmd_serve
    if args.command == "config":
        return cmd_config_check
    if args.command == "queue":
        from relay.cli import queue as queuecmd

        return getattr(queuecmd, f"cmd_{args.queue_command}")
    if args.command == "check":
        from relay.cli.check import cmd_check

        return cmd_check
    if args.command == "health":
        from relay.cli.health import cmd_health

        return cmd_health
    if args.command == "tlsrpt":
        from relay.cli import tlsrpt as tlsrptcmd

        return getattr(tlsrptcmd, f"cmd_{args.tlsrpt_command}")
    if args.command == "passwd":
        from relay.cli.passwd import cmd_passwd

        return cmd_passwd
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)(args)
    except configmod.ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
