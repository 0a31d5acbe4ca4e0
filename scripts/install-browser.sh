#!/usr/bin/env bash
# Headless Chromium and its driver (Debian packages) for the reading page's browser tests, and CJK fonts:
# fonts-noto-cjk so that Chinese renders in the browser and its screenshots, fonts-wqy-microhei (TrueType)
# for the PDF report, which embeds it. Playwright's own browser download cannot work offline.
set -euo pipefail
have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null \
  && [ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] && [ -d /usr/share/fonts/opentype/noto ]; }
have && exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
pkgs="chromium chromium-driver fonts-noto-cjk fonts-wqy-microhei"
echo "installing $pkgs (apt) ..."
$sudo apt-get install -y -q --no-install-recommends $pkgs >/dev/null \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
have
