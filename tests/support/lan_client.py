"""A mail server on the LAN, for the compose stack test: run inside the LAN namespace,
it sends one message to the relay with smtplib and prints each reply as a JSON line.

    python lan_client.py HOST PORT SENDER RECIPIENT [--hold]

With --hold it stops in the middle of DATA (after the headers), prints
{"step": "holding"} and waits for a line on stdin before it sends the rest: an open
transaction for the drain test. Exit 0 when the final reply is 250.
"""

from __future__ import annotations

import json
import smtplib
import sys


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str]) -> int:
    host, port, sender, rcpt = argv[:4]
    hold = "--hold" in argv[4:]
    smtp = smtplib.SMTP(timeout=120)
    code, banner = smtp.connect(host, int(port))
    say(step="banner", code=code, text=banner.decode())
    for step, (code, text) in (("ehlo", smtp.ehlo("mx1.lan.test")),
                               ("mail", smtp.mail(sender)), ("rcpt", smtp.rcpt(rcpt)),
                               ("data", smtp.docmd("DATA"))):
        say(step=step, code=code, text=text.decode(errors="replace"))
        if code >= 400:
            smtp.close()
            return 1
    smtp.send(f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: compose stack test\r\n"
              "Message-ID: <stack-test@lan.test>\r\n".encode())
    if hold:
        say(step="holding")
        sys.stdin.readline()
    smtp.send(b"\r\nA message from the LAN, through the published port.\r\n.\r\n")
    code, text = smtp.getreply()
    say(step="final", code=code, text=text.decode(errors="replace"))
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    return 0 if code == 250 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
