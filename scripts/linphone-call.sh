#!/usr/bin/env bash
# Call a running ivr311 from linphonec (linphone-cli) on this machine, no sound card needed.
#
# Usage: scripts/linphone-call.sh [PORT] [KEYS...]
#
#   PORT   the server's SIP port on 127.0.0.1 (default 5060)
#   KEYS   keys to press, one every KEY_GAP seconds after the call starts
#          (default: 1 1 = English, not an emergency -> main menu)
#
# Environment: LP_DIR (linphonec's home and config dir, default /tmp/lp), LISTEN (seconds to
# stay on the line after the last key, default 10), KEY_GAP (default 3), TRANSPORT (udp or
# tcp, default udp), VOICE (a WAV file to say, default: silence).
#
# linphonec runs in its file mode ("soundcard use files"): it plays VOICE as its microphone
# and records what it hears into $LP_DIR/heard.wav. Its output is in $LP_DIR/linphonec.out and
# liblinphone's debug log (every SIP message) in $LP_DIR/linphonec.log. Needs linphonec
# (apt-get install -y linphone-cli); sox, if present, prints the level.
set -euo pipefail

port=${1:-5060}
shift || true
keys=("$@")
[ ${#keys[@]} -gt 0 ] || keys=(1 1)
dir=${LP_DIR:-/tmp/lp}
listen=${LISTEN:-10}
gap=${KEY_GAP:-3}
transport=${TRANSPORT:-udp}

command -v linphonec >/dev/null || { echo "linphonec not found: apt-get install -y linphone-cli" >&2; exit 1; }

# liblinphone only starts its SIP transports once it has opened its database under $HOME.
mkdir -p "$dir/.local/share/linphone"
rm -f "$dir/heard.wav"
# Loopback only, random SIP ports, RFC 4733 keys, no echo canceller, no TLS, no video.
cat > "$dir/linphonerc" <<CFG
[sip]
sip_port=-1
sip_tcp_port=-1
sip_tls_port=0
bind_address=127.0.0.1
use_ipv6=0
use_rfc2833=1
use_info=0
contact="Linphone caller" <sip:linphone@127.0.0.1>
[rtp]
bind_address=127.0.0.1
[sound]
echocancellation=0
[video]
capture=0
display=0
CFG

target="sip:311@127.0.0.1:$port"
[ "$transport" = tcp ] && target="$target;transport=tcp"
total=$((3 + gap * ${#keys[@]} + listen + 10))
echo "dialing $target, keys: ${keys[*]}" >&2
{
    echo "soundcard use files"
    [ -z "${VOICE:-}" ] || echo "play $VOICE"
    echo "record $dir/heard.wav"
    sleep 2
    echo "call $target"
    sleep 3
    for k in "${keys[@]}"; do
        echo "$k"
        sleep "$gap"
    done
    sleep "$listen"
    echo terminate
    sleep 1
    echo quit
} | HOME="$dir" timeout "$total" linphonec -c "$dir/linphonerc" -d 6 -l "$dir/linphonec.log" \
    >"$dir/linphonec.out" 2>&1 || true

grep -E 'connected|established|ended|error|failed' "$dir/linphonec.out" >&2 || true
if ! grep -q 'connected' "$dir/linphonec.out"; then
    echo "the call was not established; see $dir/linphonec.out and $dir/linphonec.log" >&2
    exit 1
fi
[ -s "$dir/heard.wav" ] || { echo "no recording in $dir" >&2; exit 1; }
echo "heard: $dir/heard.wav"
if command -v sox >/dev/null; then
    sox "$dir/heard.wav" -n stat 2>&1 | grep -E 'Length|RMS +amplitude|Maximum amplitude'
else
    echo "$(( ($(stat -c %s "$dir/heard.wav") - 44) / 16000 )) seconds (install sox for the level)"
fi
