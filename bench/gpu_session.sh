#!/usr/bin/env bash
# The measurements a GPU session of issue 21 starts with, in parts that each fit one device command (10 minutes):
# run from the repository root on the lent machine, with the wheels of .whl/ (torchao, edt, cc3d, py-spy) carried
# along. Each step has its own time limit, so that one that hangs leaves the others their time; every step's whole
# output goes to $OUT (the device's folder that comes back; /tmp/gpu-session without it) and its tail to the
# terminal. What is kept goes into bench/results/fast_path.md by hand, with what it says.
#
#   bash bench/gpu_session.sh 1   # the GPU tests, the speed and timeline of a CT and an X-ray
#   bash bench/gpu_session.sh 2   # a fresh server's first readings (8 GiB heap reserve: where each reading's
#                                 # page faults come from; the first and a later reading's maps call by call:
#                                 # the two Triton kernels compiled in the warm-up, not in the first reading);
#                                 # an A/B beside the decode: the library's (both kernels, since run DB) against
#                                 # the library's before (the torch path, the deepest voxels with edt in a helper)
#   bash bench/gpu_session.sh 3   # what GPU readings leave behind: the reference-cycle test on the GPU reader
#                                 # (both map schedules), the kept streams' tests (no cuBLAS workspace per
#                                 # decoder or reading) and readings and batches in turn (read_many's threads' own
#                                 # streams: passed in run CT), then the GPU memory and the readings' times over
#                                 # three rounds of three shapes, two decoders kept and the library's
#   bash bench/gpu_session.sh 4   # the findings' chains' own length (maps made after the answer, so that no decode
#                                 # hides them: an H100's is 0.13 s longer than an H200's): the library's (the
#                                 # deepest voxels on the GPU in the Triton kernel) against them in a helper with
#                                 # edt, in torch's blocks, and one candidate ahead
#   bash bench/gpu_session.sh 5   # where a decode step's time goes: the kernels of a CT's and an X-ray's decode
#   bash bench/gpu_session.sh 6   # who holds the interpreter's lock during CT readings (py-spy --gil, summarised
#                                 # there: run CS's heatmaps waited 0.05 s on 1-3 ms of their own CPU)
#   bash bench/gpu_session.sh 7   # the two Triton kernels on the GPU: their tests there (the deepest voxels'
#                                 # envelopes, the decode step's attention), one decode attention layer by layer
#                                 # (bench/decode_attention.py, with other chunk sizes), and one reading A/B
#                                 # beside the decode: the library's (both kernels, since run DB), without the
#                                 # decode kernel, without the deepest voxels on the GPU, without either
#   bash bench/gpu_session.sh 8   # on an H200, whose CT reading ends with its maps: a CT's speed in a fresh
#                                 # process, then a reading A/B: the library's and the map threads' streams at a
#                                 # higher priority than the decode's (maps-urgent), with when the maps were made
#                                 # against the answer's end (the X-ray's target is met: not timed here)
#   bash bench/gpu_session.sh 9   # restart to the first fast answer (a new server process: empty compile cache,
#                                 # then the one it left) and a CT's speed in a fresh process (the library's)
#   bash bench/gpu_session.sh 10  # the lung territory on the GPU (territory.ON_DEVICE, off in the library): its
#                                 # tests there, the three ways on the benchmark CT's boxes (bench/territory_device.py),
#                                 # and the A/B of the library's (the helpers) against it, with the maps after the
#                                 # answer (the chains' own length) and beside the decode (the first version was
#                                 # slower there: runs DS-DU)
#   bash bench/gpu_session.sh 1 3 # several parts in one command, in the order given (one machine start, one
#                                 # compile cache; runs CK-CQ took 1.5-5 minutes a part)
#   bash bench/gpu_session.sh --h200 8 --else 10
#                                 # parts for an H200 and, after --else, for any other card (in sessions 33-39
#                                 # every start asked for as an H200 brought an H100 or none)
set -u
if [[ ${1:-} == --h200 ]]; then
    shift
    on_h200=() other=() into=on_h200
    for arg in "$@"; do
        if [[ $arg == --else ]]; then
            into=other
        elif [[ $into == on_h200 ]]; then
            on_h200+=("$arg")
        else
            other+=("$arg")
        fi
    done
    if nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H200; then
        set -- "${on_h200[@]}"
    else
        set -- "${other[@]}"
    fi
    if [[ $# -eq 0 ]]; then
        echo "no part for this card ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none))"
        exit 0
    fi
fi
if [[ $# -eq 0 ]]; then
    echo "usage: bash bench/gpu_session.sh PART... (each 1 to 10)" >&2
    exit 2
fi
for part in "$@"; do
    if [[ $part != [123456789] && $part != 10 ]]; then
        echo "usage: bash bench/gpu_session.sh PART... (each 1 to 10; got '$part')" >&2
        exit 2
    fi
done
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
# the repository's root too: the bench scripts import monailabel_app (runs CX and CY: deepest_gpu.py and
# decode_attention.py did not start without it)
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} MEDGEMMA_COMPILE_CACHE=${MEDGEMMA_COMPILE_CACHE:-/tmp/cc}
export PYTHONWARNINGS=ignore

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in $out/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds} s): $*"
    timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
    echo "-- exit $?"
    grep -v "^W[0-9]\{4\} \|Loading weights" "$out/$name.txt" | tail -n "${TAIL:-60}"
}

ct_speed() {  # a CT's speed in a fresh process, the library's (median of three; maps while decoding and after)
    TAIL=40 step speed 250 python3 bench/fast_path.py --only speed --speed-modalities ct --no-anchors \
        --out "$out/speed.md"
}

kernels_ab() {  # kernels_ab SECONDS: the reading A/B beside the decode, in one process (one model build and
    # warm-up), the library's (both kernels) against either without and neither; the torch path's decoder is the
    # second one kept (run CZ got through 9 readings of 3 rounds of 5 variants in 300 s)
    step kernels_ab "$1" python3 bench/prefill_ab.py --parts reading --rounds 3 \
        --variants default,decode-torch,deepest-host,decode-torch+deepest-host
}

chunk_lengths() {  # chunk_lengths SECONDS: one decode attention layer by layer, and the kernel's keys a program on
    # full layers of a CT of 85, about 40 and about 16 slices (the library's 256, one wave, others; run CZ: 35 s
    # without chunks)
    step decode_attention "$1" python3 bench/decode_attention.py --chunks 128,352,512 --lengths 22784,11008,4352
}

nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
lscpu | grep -i "model name"
for part in "$@"; do
    echo "=== part $part"
    case $part in
    1)
        step gpu_tests 140 python3 -m pytest -q -p no:cacheprovider tests/grounding/test_device_maps.py \
            tests/grounding/test_territory_device.py tests/model/test_decoding.py tests/model/test_capture.py \
            -k "cuda or rolled or staging"
        TAIL=110 step speed_timeline 300 python3 bench/fast_path.py --only speed,timeline --speed-modalities ct,xray \
            --no-anchors --out "$out/speed_timeline.md"
        ;;
    2)
        TAIL=120 step first_readings_8 200 python3 bench/first_readings.py --device cuda --reserve-gb 8 --readings 8 \
            --timeline-first --timeline
        step reading_ab 330 python3 bench/prefill_ab.py --parts reading \
            --variants default,decode-torch+deepest-host --rounds 3
        ;;
    3)
        step cycles_on_gpu 240 python3 -m pytest -q -p no:cacheprovider tests/test_reader.py \
            tests/model/test_streams.py tests/model/test_decoding.py -k "cyclic or stream or gpu_memory"
        # three shapes in turn, three rounds: two decoders kept (the policy before), then the library's (more kept
        # while the card has room); the second process finds the first's compiled steps in the compile cache
        step decoders_two 200 python3 bench/decoder_cache_memory.py --most-kept 2 \
            --order xray,ct,ct40,xray,ct,ct40,xray,ct,ct40
        step decoders_kept 200 python3 bench/decoder_cache_memory.py --order xray,ct,ct40,xray,ct,ct40,xray,ct,ct40
        ;;
    4)
        step chains_ab 420 python3 bench/prefill_ab.py --parts reading --rounds 3 \
            --variants after,after+deepest-host,after+deepest-gpu-blocks,after+candidates-1
        ;;
    5)
        TAIL=80 step decode_kernels 400 python3 bench/fast_path.py --only decode --speed-modalities ct,xray \
            --no-anchors --out "$out/decode_kernels.md"
        ;;
    6)  # py-spy's raw file runs to tens of MB: reduced here, then removed (the device gives back small files)
        TAIL=90 step gil_holders 330 bash -c 'PATH=/tmp/site/bin:$PATH py-spy record --gil --threads --nonblocking \
            -r 100 -f raw -o "$1/spy.txt" -- python3 bench/fast_path.py --only speed,timeline --speed-modalities ct \
            --no-anchors --out "$1/gil_timeline.md" > /dev/null; python3 bench/spy_summary.py "$1/spy.txt" --top 40; \
            rm -f "$1/spy.txt"' gil "$out"
        ;;
    7)
        # the compiled ones only (the interpreter's run in CI); run CZ's 22 took more than 150 s
        step kernel_tests 200 python3 -m pytest -q -p no:cacheprovider tests/grounding/test_device_maps.py \
            tests/grounding/test_distances.py tests/model/test_decode_kernel.py tests/model/test_decoding.py \
            -k "cuda or gpu or without_a_cuda_graph"
        chunk_lengths 90
        kernels_ab 290
        ;;
    8)  # the CT's speed in a fresh process (run DF's step took 107 s), then the reading A/B, whose readings say
        # when their maps were made against the answer's end: the library's and the map threads' streams above the
        # decode's (runs DN and DO took 170-185 s)
        ct_speed
        step reading_ab 220 python3 bench/prefill_ab.py --parts reading --rounds 3 --variants default,maps-urgent
        ;;
    9)
        step restart 260 python3 bench/fast_path.py --only restart --no-anchors --out "$out/restart.md"
        ct_speed
        ;;
    10)  # (runs DR-DW took 45-75 s for the tests and the three ways, 130-150 s for a reading A/B of two variants)
        # with the decode step's capture beside a thread that waits for the card (decoding.CAPTURE_MODE)
        step territory_tests 130 python3 -m pytest -q -p no:cacheprovider tests/grounding/test_territory_device.py \
            tests/grounding/test_device_maps.py tests/model/test_decoding.py -k "territory or extents or captured_while"
        step territory_ways 120 python3 bench/territory_device.py
        step territory_ab 330 python3 bench/prefill_ab.py --parts reading --rounds 3 \
            --variants after,after+territory-gpu,default,territory-gpu
        ;;
    esac
done
