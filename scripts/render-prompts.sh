#!/usr/bin/env bash
# Render the ivr311 voice prompts and tones.
#
# Usage: scripts/render-prompts.sh [-f|--force] [prompts-dir]
#
#   prompts-dir   directory holding prompts.yaml (default: <repo>/prompts)
#   -f, --force   re-render everything (default: only WAVs that are missing or
#                 older than prompts.yaml / this script)
#
# For every language key in prompts.yaml (en, es) and every prompt in it,
# writes <prompts-dir>/<lang>/<name>.wav: espeak-ng speech, resampled to
# 8000 Hz mono 16-bit signed PCM WAV, leading/trailing silence trimmed,
# peak-normalized to -3 dBFS, then padded with 50 ms of silence before and
# 150 ms after, so prompts played back to back (e.g. "ticket_filed" + digits)
# get a short, natural gap.
#
# Also synthesizes (with sox, no speech) beep.wav (1000 Hz, 250 ms),
# hold_music.wav (~20 s soft chord progression) and pause.wav (400 ms of
# silence, between the digit groups of a service request number) and copies
# them into every language directory, because the server treats each sub-directory of the
# prompts dir as a language (so no prompts/tones/ directory is left behind).
#
# Needs only bash, GNU coreutils/sed, espeak-ng and sox.
# Environment overrides: PROMPT_RATE (words per minute, default 155),
# VOICE_en (default en-us), VOICE_es (default es-419).
set -euo pipefail

die() { printf 'render-prompts: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'render-prompts: %s\n' "$*"; }

usage() { sed -n '4,9s/^# \{0,1\}//p' "$0"; }

force=0
dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -f|--force) force=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z "$dir" ]] || die "only one prompts-dir may be given"; dir="$1" ;;
    esac
    shift
done

script_path="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
[[ -n "$dir" ]] || dir="$(dirname "$(dirname "$script_path")")/prompts"
[[ -d "$dir" ]] || die "prompts directory not found: $dir"
dir="$(cd "$dir" && pwd)"
yaml="$dir/prompts.yaml"
[[ -f "$yaml" ]] || die "missing $yaml"

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=("espeak-ng")
command -v sox >/dev/null 2>&1 || missing+=("sox")
if [[ ${#missing[@]} -gt 0 ]]; then
    die "required tool(s) not found in PATH: ${missing[*]} (e.g. apt-get install espeak-ng sox)"
fi

RATE="${PROMPT_RATE:-155}"
[[ "$RATE" =~ ^[0-9]+$ ]] || die "PROMPT_RATE must be a number of words per minute"

voice_for() {
    case "$1" in
        en) printf '%s' "${VOICE_en:-en-us}" ;;
        es) printf '%s' "${VOICE_es:-es-419}" ;;
        *) return 1 ;;
    esac
}

# Spoken-form fixes applied only to what espeak-ng reads, so prompts.yaml stays
# readable: 311/911/988 are said digit by digit, ZIP as a word.
tts_text() {
    sed -E -e 's/\b311\b/3 1 1/g' -e 's/\b911\b/9 1 1/g' -e 's/\b988\b/9 8 8/g' \
        -e 's/\bZIP\b/zip/g' <<<"$1"
}

tmp="$(mktemp -d "${TMPDIR:-/tmp}/render-prompts.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Common output format: 8 kHz, mono, 16-bit signed PCM WAV.
FMT=(-r 8000 -c 1 -b 16 -e signed-integer)

# ---------------------------------------------------------------- parse YAML
declare -a langs=()
declare -A seen_lang=() texts=() names_of=()
declare -a order=()          # "lang<TAB>name" in file order
lang=""
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if [[ "$line" =~ ^([a-z]{2,3}):[[:space:]]*(#.*)?$ ]]; then
        lang="${BASH_REMATCH[1]}"
        [[ -z "${seen_lang[$lang]:-}" ]] || die "$yaml:$lineno: language '$lang' appears twice"
        voice_for "$lang" >/dev/null || die "$yaml:$lineno: no espeak-ng voice configured for language '$lang'"
        seen_lang[$lang]=1
        langs+=("$lang")
        continue
    fi
    if [[ "$line" =~ ^[[:space:]]+([a-z][a-z0-9_]*):[[:space:]]*\"([^\"]*)\"[[:space:]]*(#.*)?$ ]]; then
        [[ -n "$lang" ]] || die "$yaml:$lineno: prompt before any language key"
        name="${BASH_REMATCH[1]}"
        text="${BASH_REMATCH[2]}"
        [[ -z "${texts[$lang/$name]+x}" ]] || die "$yaml:$lineno: duplicate prompt '$name' in '$lang'"
        [[ "$text" =~ [^[:space:]] ]] || die "$yaml:$lineno: empty text for '$lang/$name'"
        texts[$lang/$name]="$text"
        names_of[$lang]+="$name "
        order+=("$lang"$'\t'"$name")
        continue
    fi
    die "$yaml:$lineno: cannot parse line (expected 'lang:' or '  name: \"text\"'): $line"
done <"$yaml"

[[ ${#langs[@]} -gt 0 ]] || die "$yaml: no languages found"

# Every prompt name must exist in every language.
bad=0
for l in "${langs[@]}"; do
    for name in ${names_of[$l]}; do
        for o in "${langs[@]}"; do
            if [[ -z "${texts[$o/$name]+x}" ]]; then
                printf 'render-prompts: error: prompt "%s" exists in "%s" but not in "%s"\n' "$name" "$l" "$o" >&2
                bad=1
            fi
        done
    done
done
[[ $bad -eq 0 ]] || die "prompt names differ between languages in $yaml"

for reserved in beep hold_music pause; do
    [[ -z "${texts[${langs[0]}/$reserved]+x}" ]] || die "'$reserved' is a generated tone; do not define it in $yaml"
done

# A file is up to date if it exists and is newer than its inputs.
fresh() {
    local out="$1"; shift
    [[ $force -eq 0 && -s "$out" ]] || return 1
    local dep
    for dep in "$@"; do [[ "$out" -nt "$dep" ]] || return 1; done
}

# ------------------------------------------------------------ speech prompts
# render_prompt <lang> <text> <out.wav>
# The text may contain [[xx]] markers switching the voice to language xx for
# the rest of the text; segments are synthesized separately and joined with a
# 300 ms pause.
render_prompt() {
    local lang="$1" text="$2" out="$3"
    local -a segs=()
    local seg_lang seg_text voice i=0 line
    local split
    split="$(sed -E 's/\[\[([a-z]{2,3})\]\]/\n\1\t/g' <<<"$text")"
    local first=1
    while IFS= read -r line; do
        if [[ $first -eq 1 ]]; then
            seg_lang="$lang"; seg_text="$line"; first=0
        else
            seg_lang="${line%%$'\t'*}"; seg_text="${line#*$'\t'}"
        fi
        [[ "$seg_text" =~ [^[:space:]] ]] || continue
        voice="$(voice_for "$seg_lang")" || die "unknown language marker [[${seg_lang}]] in: $text"
        i=$((i + 1))
        # espeak-ng reads the text from stdin, so text starting with '-' is safe.
        tts_text "$seg_text" | espeak-ng -v "$voice" -s "$RATE" --stdout >"$tmp/seg_raw.wav" \
            || die "espeak-ng failed (voice $voice) for: $seg_text"
        # resample, then trim leading/trailing silence (below -45 dBFS)
        sox -V1 -R -t wav "$tmp/seg_raw.wav" "${FMT[@]}" "$tmp/seg_$i.wav" \
            rate -v 8000 \
            silence 1 0.01 -45d reverse silence 1 0.01 -45d reverse \
            || die "sox failed while processing: $seg_text"
        if [[ $i -gt 1 ]]; then segs+=("$tmp/gap.wav"); fi
        segs+=("$tmp/seg_$i.wav")
    done <<<"$split"
    [[ $i -gt 0 ]] || die "nothing to say for $out"
    [[ -f "$tmp/gap.wav" ]] || sox -V1 -R -n "${FMT[@]}" "$tmp/gap.wav" trim 0 0.3
    sox -V1 -R "${segs[@]}" "${FMT[@]}" "$tmp/out.wav" gain -n -3 pad 0.05 0.15 \
        || die "sox failed while assembling $out"
    mv -f "$tmp/out.wav" "$out"
}

rendered=0
skipped=0
for l in "${langs[@]}"; do mkdir -p "$dir/$l"; done
for entry in "${order[@]}"; do
    l="${entry%%$'\t'*}"
    name="${entry#*$'\t'}"
    out="$dir/$l/$name.wav"
    if fresh "$out" "$yaml" "$script_path"; then
        skipped=$((skipped + 1))
        continue
    fi
    render_prompt "$l" "${texts[$l/$name]}" "$out"
    rendered=$((rendered + 1))
    log "rendered $l/$name.wav"
done

# ------------------------------------------------------------------- tones
# beep.wav: 1000 Hz sine, 250 ms, -6 dBFS, 5 ms fades so it does not click.
gen_beep() {
    sox -V1 -R -n "${FMT[@]}" "$1" synth 0.25 sine 1000 fade h 0.005 0.25 0.005 gain -n -6
}

# hold_music.wav: ~20 s, 60 BPM-ish: I - vi - IV - V in C (Cmaj7, Am7, Fmaj7,
# G6), 5 s per chord. Soft sine/triangle pad with slow fades plus a gentle
# plucked arpeggio, a little reverb, band-limited for the phone, -6 dBFS peak.
# The last chord (G) leads back into the first, so it loops naturally.
gen_hold_music() {
    local out="$1" w="$tmp/hold"
    mkdir -p "$w"
    local chord_len=5 step=0.625
    # pad voicings (Hz) and 8-note arpeggio patterns (Hz), one line per chord
    local -a pads=(
        "261.63 329.63 392.00 493.88"
        "220.00 261.63 329.63 392.00"
        "174.61 220.00 261.63 329.63"
        "196.00 246.94 293.66 329.63"
    )
    local -a arps=(
        "523.25 659.25 783.99 987.77 783.99 659.25 523.25 659.25"
        "440.00 523.25 659.25 783.99 659.25 523.25 440.00 523.25"
        "349.23 440.00 523.25 659.25 523.25 440.00 349.23 440.00"
        "392.00 493.88 587.33 659.25 587.33 493.88 392.00 587.33"
    )
    local c n f k=0
    local -a chord_files=() arp_files=() notes=()
    for c in 0 1 2 3; do
        notes=()
        n=0
        for f in ${pads[$c]}; do
            n=$((n + 1))
            # each pad note: a sine plus a softened (low-passed) triangle
            sox -V1 -R -n "${FMT[@]}" "$w/pad_${c}_${n}s.wav" synth "$chord_len" sine "$f"
            sox -V1 -R -n "${FMT[@]}" "$w/pad_${c}_${n}t.wav" synth "$chord_len" triangle "$f" lowpass 900
            notes+=("$w/pad_${c}_${n}s.wav" "$w/pad_${c}_${n}t.wav")
        done
        sox -V1 -R -m "${notes[@]}" "${FMT[@]}" "$w/chord_$c.wav" \
            tremolo 0.2 15 fade q 1.2 "$chord_len" 1.5
        chord_files+=("$w/chord_$c.wav")
        for f in ${arps[$c]}; do
            k=$((k + 1))
            sox -V1 -R -n "${FMT[@]}" "$w/arp_$(printf %03d $k).wav" \
                synth "$step" pluck "$f" fade t 0.003 "$step" 0.08
            arp_files+=("$w/arp_$(printf %03d $k).wav")
        done
    done
    sox -V1 -R "${chord_files[@]}" "$w/pads.wav"
    sox -V1 -R "${arp_files[@]}" "$w/arps.wav" lowpass 1800 gain -n -6
    sox -V1 -R -m -v 1 "$w/pads.wav" -v 0.45 "$w/arps.wav" "${FMT[@]}" "$out" \
        reverb 40 50 60 highpass 150 lowpass 3000 trim 0 20 fade q 0.5 20 1.5 gain -n -6
}

# pause.wav: 400 ms of digital silence (-D: no dither, which would add ±1 LSB noise).
gen_pause() {
    sox -V1 -R -D -n "${FMT[@]}" "$1" trim 0 0.4
}

mkdir -p "$tmp/tones"
gen_beep "$tmp/tones/beep.wav"
gen_hold_music "$tmp/tones/hold_music.wav"
gen_pause "$tmp/tones/pause.wav"
tones_updated=0
for l in "${langs[@]}"; do
    for t in beep hold_music pause; do
        if fresh "$dir/$l/$t.wav" "$script_path" && cmp -s "$tmp/tones/$t.wav" "$dir/$l/$t.wav"; then
            continue
        fi
        cp -f "$tmp/tones/$t.wav" "$dir/$l/$t.wav.tmp"
        mv -f "$dir/$l/$t.wav.tmp" "$dir/$l/$t.wav"
        tones_updated=$((tones_updated + 1))
        log "wrote $l/$t.wav"
    done
done

# The server would take a tones/ directory for a language: never leave one.
if [[ -d "$dir/tones" ]]; then
    rm -rf "$dir/tones"
    log "removed stale $dir/tones/ (tones now live in each language directory)"
fi

# Warn about WAVs that no longer correspond to a prompt (not deleted: they may
# be real studio recordings someone dropped in on purpose).
for l in "${langs[@]}"; do
    for f in "$dir/$l"/*.wav; do
        [[ -e "$f" ]] || continue
        name="$(basename "$f" .wav)"
        [[ "$name" == beep || "$name" == hold_music || "$name" == pause || -n "${texts[$l/$name]+x}" ]] && continue
        log "warning: $l/$name.wav is not listed in prompts.yaml"
    done
done

log "done: ${#order[@]} prompts in ${#langs[@]} languages (${langs[*]}); rendered $rendered, up to date $skipped, tone files updated $tones_updated"
