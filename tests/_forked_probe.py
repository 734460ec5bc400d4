"""A program for tests/test_forked.py: prints what it was given and exits as told.

python -m tests._forked_probe ok|exit3|message|raise|sleep ARG...
"""

import json
import os
import sys
import time

if __name__ == "__main__":
  mode = sys.argv[1]
  print(
    json.dumps(
      {"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("POFX_PROBE"), "stdin": sys.stdin.read()}
    )
  )
  print("to stderr", file=sys.stderr)
  if mode == "exit3":
    sys.exit(3)
  if mode == "message":
    sys.exit("a one-line refusal")
  if mode == "raise":
    raise ValueError("boom")
  if mode == "sleep":
    time.sleep(60)
