#!/usr/bin/python3
"""Regenerate the config reference in README.md from `dcmoe config --reference`.
usage: tools/update-readme-reference.py [build/dcmoe]   (--check: exit 1 if out of date)"""
import os
import subprocess
import sys

root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
args = [a for a in sys.argv[1:] if not a.startswith("--")]
exe = args[0] if args else os.path.join(root, "build", "dcmoe")
table = subprocess.run([exe, "config", "--reference"], check=True, capture_output=True, text=True).stdout
path = os.path.join(root, "README.md")
text = open(path).read()
start, end = "<!-- config-reference -->\n", "<!-- /config-reference -->"
i, j = text.index(start) + len(start), text.index(end)
new = text[:i] + table + text[j:]
if "--check" in sys.argv:
    if new != text:
        print("README.md config reference is out of date: run tools/update-readme-reference.py")
        sys.exit(1)
    print("README.md config reference matches `dcmoe config --reference`")
    sys.exit(0)
open(path, "w").write(new)
print("README.md config reference updated")
