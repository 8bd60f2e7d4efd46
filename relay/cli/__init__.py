"""The `relay` command line: the parser and dispatch (.main) and one module per command
family (queue, tlsrpt, check, health, passwd); `relay serve` is relay.app.

May import: every package (it is the top of the house). Nothing imports relay.cli.
"""
