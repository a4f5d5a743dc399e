#!/usr/bin/env bash
# Run a device call on the committed tree while the working tree holds uncommitted edits (a helper's, half done):
# a call copies the working tree as it is. This writes .snap/ (git-excluded; carry it): HEAD's copy of every tracked
# file that differs from HEAD, and .snap/restore.sh, which puts them back and deletes the untracked files. Then:
#   bash scripts/device_snapshot.sh
#   run(carry=[".whl", ".fi_cache", ".snap"], command="bash .snap/restore.sh; bash scripts/gpu_tests.sh")
# Re-run it before each call (HEAD moves). Only the tree of the call changes; nothing here touches the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.snap/" .git/info/exclude 2>/dev/null || echo "/.snap/" >> .git/info/exclude
rm -rf .snap && mkdir -p .snap/tree
{ echo '#!/usr/bin/env bash'; echo 'cp -r .snap/tree/. . 2>/dev/null || true'; } > .snap/restore.sh
git diff --name-only HEAD | while read -r f; do
  if git cat-file -e "HEAD:$f" 2>/dev/null; then
    mkdir -p ".snap/tree/$(dirname "$f")" && git show "HEAD:$f" > ".snap/tree/$f"
  else
    printf "rm -f '%s'\n" "$f" >> .snap/restore.sh   # added since HEAD: not in the committed tree
  fi
done
git ls-files --others --exclude-standard | while read -r f; do printf "rm -f '%s'\n" "$f" >> .snap/restore.sh; done
echo "echo 'snapshot: the tree of $(git rev-parse --short HEAD)'" >> .snap/restore.sh
echo "device_snapshot: .snap/ restores $(git rev-parse --short HEAD) ($(find .snap/tree -type f | wc -l) file(s) back," \
     "$(grep -c '^rm -f' .snap/restore.sh || true) untracked removed)"
