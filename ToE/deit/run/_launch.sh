# Kept for scripts written against it: the launcher is ToE/common/launch.sh (shared by every
# trainer); a script that sets no TOE_MAIN launches ToE/deit/main.py.
TOE_MAIN="${TOE_MAIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/main.py}"
source "$(dirname "${BASH_SOURCE[0]}")/../../common/launch.sh"
