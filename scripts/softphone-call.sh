#!/usr/bin/env bash
# Call a running ivr311 from baresip on this machine (no sound card needed).
#
# Usage: scripts/softphone-call.sh [PORT] [KEYS...]
#
#   PORT   the server's SIP port on 127.0.0.1 (default 5060)
#   KEYS   keys to press, one every KEY_GAP seconds after the call starts
#          (default: 1 1 = English, not an emergency -> main menu)
#
# Environment: BS_DIR (baresip config dir, default /tmp/bs), LISTEN (seconds
# to stay on the line after the last key, default 10), KEY_GAP (default 3),
# SIP_LISTEN (baresip's own SIP address, default 127.0.0.1:5062).
#
# Writes $BS_DIR/config and $BS_DIR/accounts, dials sip:311@127.0.0.1:PORT,
# presses KEYS as RFC 4733 telephone-events, hangs up, and leaves what it
# heard in $BS_DIR/heard.wav (what it sent back in $BS_DIR/sent.wav) and
# baresip's output in $BS_DIR/baresip.log. Needs baresip
# (apt-get install -y baresip); sox, if present, prints the level.
set -euo pipefail

port=${1:-5060}
shift || true
keys=("$@")
[ ${#keys[@]} -gt 0 ] || keys=(1 1)
dir=${BS_DIR:-/tmp/bs}
listen=${LISTEN:-10}
gap=${KEY_GAP:-3}
sip_listen=${SIP_LISTEN:-127.0.0.1:5062}
modules=/usr/lib/baresip/modules

command -v baresip >/dev/null || { echo "baresip not found: apt-get install -y baresip" >&2; exit 1; }
[ -e "$modules/aubridge.so" ] || { echo "no baresip modules in $modules" >&2; exit 1; }

mkdir -p "$dir"
rm -f "$dir"/dump-*.wav "$dir/heard.wav" "$dir/sent.wav"
# aubridge loops what baresip plays back into its microphone: RTP flows at
# a steady 50 packets/s without a sound card. sndfile records each call.
cat > "$dir/config" <<CFG
sip_listen		$sip_listen
net_interface		127.0.0.1
audio_source		aubridge,loop
audio_player		aubridge,loop
snd_path		$dir
module_path		$modules
module			stdio.so
module			g711.so
module			aubridge.so
module			sndfile.so
module_tmp		account.so
module_app		menu.so
CFG
printf '<sip:caller@127.0.0.1>;regint=0\n' > "$dir/accounts"

total=$((3 + gap * ${#keys[@]} + listen + 10))
echo "dialing sip:311@127.0.0.1:$port, keys: ${keys[*]}" >&2
{
    sleep 3
    for k in "${keys[@]}"; do
        printf '%s' "$k"
        sleep "$gap"
    done
    sleep "$listen"
    printf '/hangup\n'
    sleep 1
    printf '/quit\n'
} | timeout "$total" baresip -f "$dir" -e "/dial sip:311@127.0.0.1:$port" >"$dir/baresip.log" 2>&1 || true

tr '\r' '\n' <"$dir/baresip.log" | grep -E 'established|terminated|DTMF|failed|error' | grep -v 'audio=' >&2 || true
if ! grep -q 'established' "$dir/baresip.log"; then
    echo "the call was not established; see $dir/baresip.log" >&2
    exit 1
fi
dec=$(ls -t "$dir"/dump-*-dec.wav 2>/dev/null | head -1 || true)
enc=$(ls -t "$dir"/dump-*-enc.wav 2>/dev/null | head -1 || true)
[ -n "$dec" ] || { echo "no recording in $dir" >&2; exit 1; }
mv "$dec" "$dir/heard.wav"
[ -z "$enc" ] || mv "$enc" "$dir/sent.wav"
echo "heard: $dir/heard.wav"
if command -v sox >/dev/null; then
    sox "$dir/heard.wav" -n stat 2>&1 | grep -E 'Length|RMS +amplitude|Maximum amplitude'
else
    echo "$(( ($(stat -c %s "$dir/heard.wav") - 44) / 16000 )) seconds (install sox for the level)"
fi
