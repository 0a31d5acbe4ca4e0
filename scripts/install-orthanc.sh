#!/usr/bin/env bash
# Orthanc and its DICOMweb plugin (Debian packages), for the PACS tests and a local test PACS.
# The packaged system service is not used: the tests start their own Orthanc on loopback.
set -euo pipefail
if command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "installing orthanc and orthanc-dicomweb (apt) ..."
$sudo apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null; }
command -v Orthanc >/dev/null
