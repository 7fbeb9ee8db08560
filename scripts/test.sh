#!/usr/bin/env bash
# The whole test suite (fast and slow tests), in two streams at once: the
# machine has 2 cores and most tests wait on one single-threaded TCG appliance.
#
#   stream A: the exclusive tests (they restart libvirtd, install the hook or
#             the package: no other test may use libvirtd meanwhile), then FILES_A
#   stream B: FILES_NO_LIBVIRTD (they never talk to libvirtd) while A's exclusive
#             stage runs, then FILES_B once that stage is over
#
# Stream A's output is shown as it comes; stream B's is kept and shown at the end.
# Every test file must be in exactly one list below (checked before anything
# runs), so a new file is never left out.  VMSHARE_TEST_SERIAL=1 runs the same
# stages one after the other.  Extra arguments go to every pytest run (a stage
# they leave empty is then fine).
# Under CI=true a missing tool or daemon fails the run (tests/conftest.py), and
# any test reported as skipped makes this script fail too.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

I=tests/integration
FILES_NO_LIBVIRTD=(tests/unit "$I/test_qemu_img.py" "$I/test_qcow2_dedup.py" "$I/test_guest_writer_contract.py"
    "$I/test_sparse_and_odd.py" "$I/test_verification.py" "$I/test_session_launch.py"
    "$I/test_members_gc_chains.py" "$I/test_switch.py" "$I/test_domain_states.py" "$I/test_rpm_package.py"
    "$I/test_reclaim_estimate.py")
FILES_A=("$I/test_libvirt_hook.py" "$I/test_watch_daemon.py" "$I/test_debian_package.py"
    "$I/test_patch.py" "$I/test_layouts.py" "$I/test_members_gc.py" "$I/test_doctor_pools.py")
FILES_B=("$I/test_consolidate.py" "$I/test_inspect_plan.py" "$I/test_testbed.py" "$I/test_hibernation_disks.py"
    "$I/test_hook_process.py" "$I/test_domains.py" "$I/test_patch_kernel.py")
EXTRA=("$@")

# check_lists: every tests/**/test_*.py in exactly one list, and nothing else.
check_lists() {
    local listed all
    listed="$(for entry in "${FILES_NO_LIBVIRTD[@]}" "${FILES_A[@]}" "${FILES_B[@]}"; do
        if [[ -d $entry ]]; then find "$entry" -name 'test_*.py'; else echo "$entry"; fi
    done | sort)"
    all="$(find tests -name 'test_*.py' | sort)"
    if [[ "$listed" != "$all" ]]; then
        echo "test: scripts/test.sh must name every test file exactly once:" >&2
        diff <(echo "$all") <(echo "$listed") | sed -n 's/^< /  not in any list: /p; s/^> /  listed but absent or listed twice: /p' >&2
        return 1
    fi
}
check_lists

bash scripts/setup.sh
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

# skipped_in_ci LOG: true when CI=true and pytest reported a skipped test.
skipped_in_ci() {
    [[ "${CI:-}" == true ]] && grep -q '^SKIPPED ' "$1"
}

# run_stage NAME SHOW PYTEST-ARGS...: one pytest run, with skip reasons (-rs) and
# the slowest tests (--durations: where the time budget goes) in its summary,
# kept in $logs/NAME.log (and shown as it comes when SHOW is yes); its status
# goes to $logs/NAME.rc.
run_stage() {
    local name="$1" show="$2" rc=0 start=$SECONDS
    shift 2
    echo "test: stage $name started at $(date +%T)"
    local argv=(.venv/bin/python -m pytest -rs --durations=25 --durations-min=15 "$@" "${EXTRA[@]}")
    if [[ $show == yes ]]; then
        "${argv[@]}" 2>&1 | tee "$logs/$name.log" || rc=$?
    else
        "${argv[@]}" >"$logs/$name.log" 2>&1 || rc=$?
    fi
    if ((rc == 5)); then
        if ((${#EXTRA[@]})); then
            rc=0  # the extra arguments selected nothing here
        else
            echo "test: stage $name collected no test" >&2
        fi
    fi
    if ((rc == 0)) && skipped_in_ci "$logs/$name.log"; then
        echo "test: stage $name: tests were skipped under CI=true" >&2
        rc=1
    fi
    echo "$rc" >"$logs/$name.rc"
    echo "test: stage $name finished at $(date +%T): exit $rc after $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
}

serial=no
[[ "${VMSHARE_TEST_SERIAL:-}" == 1 ]] && serial=yes

stream_a() {
    run_stage exclusive yes tests -m exclusive
    touch "$logs/exclusive.done"
    run_stage a yes "${FILES_A[@]}" -m "not exclusive"
}

stream_b() {
    VMSHARE_TEST_NO_LIBVIRTD=1 run_stage no-libvirtd "$serial" "${FILES_NO_LIBVIRTD[@]}" -m "not exclusive"
    while [[ ! -e "$logs/exclusive.done" ]]; do sleep 5; done
    run_stage b "$serial" "${FILES_B[@]}" -m "not exclusive"
}

if [[ $serial == yes ]]; then
    stream_a
    stream_b
else
    stream_a &
    a=$!
    stream_b &
    b=$!
    wait "$a" || true
    wait "$b" || true
    for name in no-libvirtd b; do
        echo
        echo "======================== stage $name (stream B, ran beside stream A) ========================"
        cat "$logs/$name.log" 2>/dev/null || echo "(no output)"
    done
fi

status=0
for name in exclusive a no-libvirtd b; do
    rc="$(cat "$logs/$name.rc" 2>/dev/null || echo missing)"
    echo "test: stage $name: exit $rc"
    [[ "$rc" == 0 ]] || status=1
done
echo "test: exit $status"
exit "$status"
