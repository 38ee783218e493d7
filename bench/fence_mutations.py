"""Break every fence once on purpose and time the test that must catch it.

Run by hand (not part of the tests):
    .venv/bin/python bench/fence_mutations.py [--only NAME]

Each mutation below changes one guard of the store's scripts, the lifecycle or ``decide`` to the
wrong thing (the way a careless edit would), in a copy of this tree; the named test must then fail,
and within 10 seconds. The table says which test caught which mutation and how long it took; a
mutation that no test catches is reported as SURVIVED and the script exits 1. The working tree is
never touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 10.0


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    test: str
    #: how long the test may take to catch it (a test that starts a real worker takes longer)
    limit_s: float = LIMIT_S


MUTATIONS = [
    Mutation(
        "affinity remembers a failed build",
        "buildq/store/lua/finish.lua",
        "if state == 'succeeded' and affinity_key ~= '' and daemon ~= '' then",
        "if affinity_key ~= '' and daemon ~= '' then",
        "tests/test_store.py::test_only_a_success_is_remembered_for_the_cache_and_joins_the_baseline",
    ),
    Mutation(
        "the lease is renewed only once",
        "buildq/engine/runner.py",
        "    RunRegistry.stamp(run_file)\n    return False",
        "    RunRegistry.stamp(run_file)\n    return True",
        "tests/test_lifecycle.py::test_the_lease_is_held_throughout_a_build_longer_than_its_ttl",
    ),
    Mutation(
        "the slot wait forgets the daemon to avoid",
        "buildq/engine/lifecycle.py",
        "stages.append((None, self.slot_wait_s, avoid))",
        "stages.append((None, self.slot_wait_s, None))",
        "tests/test_lifecycle.py::test_a_retry_waiting_for_a_slot_avoids_the_daemon_that_dropped_it",
    ),
    Mutation(
        "the load index forgets the daemon to avoid",
        "buildq/store/lua/load_fn.lua",
        "  if c[1] and c[1] == avoid and c[2] then return c[2] end\n",
        "",
        "tests/test_store.py::test_take_slot_honours_the_daemon_to_avoid",
    ),
    Mutation(
        "a claim takes a daemon without room",
        "buildq/store/lua/load_fn.lua",
        "'(' .. limit",
        "'+inf'",
        "tests/test_store.py::test_the_least_loaded_daemon_and_none_when_all_are_full",
    ),
    Mutation(
        "a down daemon stays in the running",
        "buildq/store/lua/breaker.lua",
        "  if opened == 1 then move(DOWN_LOAD) end\n",
        "",
        "tests/test_store.py::test_a_down_daemon_is_never_the_least_loaded",
    ),
    Mutation(
        "a slot is given back without saying so (twice, later)",
        "buildq/store/lua/job_fn.lua",
        "    return {'slot', ''}",
        "    return {}",
        "tests/test_store.py::test_release_gives_back_only_what_is_ours_and_keeps_the_error",
    ),
    Mutation(
        "the requeue script's fence is removed",
        "buildq/store/lua/requeue.lua",
        "if h.done_gen or h.gen ~= gen then return 0 end\n",
        "",
        "tests/test_store.py::test_a_requeue_by_a_holder_that_lost_its_claim_publishes_nothing",
    ),
    Mutation(
        "the finish script's fence is removed",
        "buildq/store/lua/finish.lua",
        "if h.gen ~= gen then return 0 end\n",
        "",
        "tests/test_store.py::test_a_finish_by_a_holder_that_lost_its_claim_writes_nothing",
    ),
    Mutation(
        "the renewal does not check the claim generation",
        "buildq/store/lua/renew.lua",
        "if h[2] or h[1] ~= gen then return 0 end",
        "if h[2] then return 0 end",
        "tests/test_store.py::test_renewal_retakes_an_expired_lease_only_while_nobody_claimed_since",
    ),
    Mutation(
        "a live lease of another claim is taken",
        "buildq/store/lua/claim.lua",
        "if not again and h.lease and tonumber(h.lease_until or '0') > now then return {1} end",
        "",
        "tests/test_store.py::test_a_held_lease_makes_the_claim_not_ours",
    ),
    Mutation(
        "a stale delivery may claim",
        "buildq/store/lua/claim.lua",
        "if h.delivery and h.delivery ~= delivery then return {3} end",
        "",
        "tests/test_store.py::test_a_message_that_is_not_the_current_delivery_cannot_claim",
    ),
    Mutation(
        "a forged rejection may end another job",
        "buildq/store/lua/reject.lua",
        "if h.delivery and h.delivery ~= delivery then return 0 end",
        "",
        "tests/test_store.py::test_a_rejection_is_stored_for_the_jobs_own_delivery_only",
    ),
    Mutation(
        "release gives back a claim that is not ours",
        "buildq/store/lua/release.lua",
        "if h.done_gen or h.gen ~= gen or not h.lease then return 0 end",
        "",
        "tests/test_store.py::test_release_gives_back_only_what_is_ours_and_keeps_the_error",
    ),
    Mutation(
        "a cancel is written over a finished job",
        "buildq/store/lua/cancel.lua",
        "if h[1] then return 0 end",
        "",
        "tests/test_store.py::test_a_cancel_leaves_a_finished_job_alone",
    ),
    Mutation(
        "a submit retried after a lost reply pushes again",
        "buildq/store/lua/submit.lua",
        "if redis.call('HEXISTS', job_hash, 'enqueued_at') == 1 then",
        "if false then",
        "tests/test_store.py::test_a_submit_pushes_once_and_times_the_job_by_the_server",
    ),
    Mutation(
        "the janitor pushes a message that is still in its queue",
        "buildq/store/lua/lost.lua",
        "      and tonumber(h[6]) + margin_ms < head_stamp(h[4], job_prefix) then",
        "      then",
        "tests/test_janitor.py::test_messages_in_the_queue_unacked_or_claimed_are_left_alone",
    ),
    Mutation(
        "two janitors run at once",
        "buildq/store/lua/lease.lua",
        "if holder and holder ~= owner then return 0 end",
        "",
        "tests/test_janitor.py::test_one_janitor_per_deployment",
    ),
    Mutation(
        "the janitor frees a live claim's slot",
        "buildq/store/lua/expired_slots.lua",
        "(h.done_gen or tonumber(h.lease_until or '0') + grace_ms < now)",
        "true",
        "tests/test_capacity.py::test_a_live_claims_slot_is_never_taken_by_the_janitor",
    ),
    Mutation(
        "a takeover does not wait for the other host's run",
        "buildq/engine/lifecycle.py",
        "            if self.store.dead_gen(job_id) >= gen or domain not in self.store.live(DOMAINS):",
        "            if True:",
        "tests/test_lifecycle.py::test_a_takeover_from_another_host_waits_until_its_run_is_known_dead",
    ),
    Mutation(
        "a retry held by a live worker is put back",
        "buildq/store/lua/restore_stalled.lua",
        "        held = alive and tonumber(alive) > now",
        "        held = false",
        "tests/test_stalls.py::test_a_held_retry_stays_while_its_holder_lives_and_is_put_back_when_it_is_gone",
    ),
    Mutation(
        "a retry held by a dead worker is never put back",
        "buildq/store/lua/restore_stalled.lua",
        "        held = alive and tonumber(alive) > now",
        "        held = true",
        "tests/test_stalls.py::test_a_held_retry_stays_while_its_holder_lives_and_is_put_back_when_it_is_gone",
    ),
    Mutation(
        "decide allows one attempt too many",
        "buildq/engine/lifecycle.py",
        '    if counted >= settings.retry_max_attempts:\n        return Done("failed")',
        '    if counted > settings.retry_max_attempts:\n        return Done("failed")',
        "tests/test_lifecycle.py::test_the_last_allowed_attempt_ends_the_job",
    ),
    Mutation(
        "decide retries a build whose cancel was asked for",
        "buildq/engine/lifecycle.py",
        'if s.outcome != "failed" or not s.transient or s.cancel_requested:',
        'if s.outcome != "failed" or not s.transient:',
        "tests/test_lifecycle.py::test_nobody_retries_a_build_whose_cancel_was_asked_for",
    ),
    Mutation(
        "a reconnect inside a command's retry loops on its own (a dead master dialled again)",
        "buildq/store/connect.py",
        "        if isinstance(error, AWAY) and _retry_loops() > 1:",
        "        if False:",
        "tests/test_failover.py::"
        "test_the_patience_policy_retries_a_command_and_gives_a_reconnect_inside_it_one_try",
    ),
    Mutation(
        "a script is named by a SHA Redis does not know",
        "buildq/store/scripts.py",
        'self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()',
        'self.sha = hashlib.sha1(self.source.encode("utf-8") + b" ").hexdigest()',
        "tests/test_store.py::test_scripts_run_by_their_own_sha_and_a_pool_process_preloads_them",
    ),
    # -- cache scopes, the export lease, superseded builds (docs/cache-scopes.md) --
    Mutation(
        "the export lease lets an older build export over a newer holder",
        "buildq/store/lua/export_fn.lua",
        "    if newer(h.order, h.job, order, job_id) then return {2, h.job} end\n",
        "",
        "tests/test_cache_scopes.py::test_an_older_build_skips_while_a_newer_one_holds_the_lease",
    ),
    Mutation(
        "the export lease forgets the newest export done",
        "buildq/store/lua/export_fn.lua",
        "  if h.done_order and newer(h.done_order, h.done_job or '', order, job_id) then "
        "return {2, h.done_job or ''} end",
        "",
        "tests/test_cache_scopes.py::test_once_a_newer_build_exported_an_older_one_never_exports",
    ),
    Mutation(
        "the export lease is released by a build that does not hold it",
        "buildq/store/lua/export_fn.lua",
        "  if h.job ~= job_id or tonumber(h['until'] or '0') <= 0 then return false end\n",
        "",
        "tests/test_cache_scopes.py::test_only_the_holder_releases_and_a_dead_holder_s_lease_lapses",
    ),
    Mutation(
        "the export lease is renewed for a holder that gave it back",
        "buildq/store/lua/export_fn.lua",
        "  if h.job == job_id and live then",
        "  if h.job == job_id then",
        "tests/test_store.py::test_the_last_write_gives_back_the_export_lease_in_its_round_trip",
    ),
    Mutation(
        "the export lease is given back twice",
        "buildq/store/lua/export_fn.lua",
        "h.job ~= job_id or tonumber(h['until'] or '0') <= 0 then",
        "h.job ~= job_id then",
        "tests/test_store.py::test_the_last_write_gives_back_the_export_lease_in_its_round_trip",
    ),
    Mutation(
        "the export lease is granted over a live older holder",
        "buildq/store/lua/export_fn.lua",
        "    return {3, h.job}",
        "    return {1, ''}",
        "tests/test_cache_scopes.py::test_a_newer_build_waits_while_an_older_one_holds_it_then_takes_it",
    ),
    Mutation(
        "a dead holder's export lease never lapses",
        "buildq/store/lua/export_fn.lua",
        "  local live = tonumber(h['until'] or '0') > now\n",
        "  local live = true\n",
        "tests/test_cache_scopes.py::test_only_the_holder_releases_and_a_dead_holder_s_lease_lapses",
    ),
    Mutation(
        "the claim takes the export lease before a lost run is settled",
        "buildq/store/lua/claim.lua",
        "if export_lease ~= '' and cancelled == 0 and daemon ~= '' and not h.running then",
        "if export_lease ~= '' and cancelled == 0 and daemon ~= '' then",
        "tests/test_store.py::test_a_build_that_starts_at_once_gets_its_export_lease_with_the_claim",
    ),
    Mutation(
        "the claim takes the export lease for a build without a slot",
        "buildq/store/lua/claim.lua",
        "if export_lease ~= '' and cancelled == 0 and daemon ~= '' and not h.running then",
        "if export_lease ~= '' and cancelled == 0 and not h.running then",
        "tests/test_store.py::test_a_build_that_starts_at_once_gets_its_export_lease_with_the_claim",
    ),
    Mutation(
        "the finishing write keeps the export lease",
        "buildq/store/lua/finish.lua",
        "if export_lease ~= '' then release_export(export_lease, job_id, export_order, exported) end",
        "",
        "tests/test_store.py::test_the_last_write_gives_back_the_export_lease_in_its_round_trip",
    ),
    Mutation(
        "the requeue keeps the export lease",
        "buildq/store/lua/requeue.lua",
        "if export_lease ~= '' then release_export(export_lease, job_id, export_order, '') end",
        "",
        "tests/test_store.py::test_the_last_write_gives_back_the_export_lease_in_its_round_trip",
    ),
    Mutation(
        "the finishing write gives back another build's export lease",
        "buildq/store/lua/export_fn.lua",
        "  if h.job ~= job_id or tonumber(h['until'] or '0') <= 0 then return false end\n",
        "",
        "tests/test_store.py::test_the_last_write_gives_back_the_export_lease_in_its_round_trip",
    ),
    Mutation(
        "a build that ended keeps holding the export lease",
        "buildq/engine/lifecycle.py",
        "ExportRelease(history.enqueued_at, exported) if build.export_held else None",
        "None",
        "tests/test_cache_scopes_worker.py::"
        "test_a_scoped_build_imports_its_scope_then_main_and_exports_to_its_scope",
    ),
    Mutation(
        "a build that lost the export lease exports anyway",
        "buildq/engine/lifecycle.py",
        'cache=CachePlan(export_ref, tuple(imports), export=job.push and lease == "granted"),',
        "cache=CachePlan(export_ref, tuple(imports), export=job.push),",
        "tests/test_cache_scopes_worker.py::test_a_build_older_than_the_ref_s_exporter_skips_its_export",
    ),
    Mutation(
        "a finished job is superseded",
        "buildq/store/lua/supersede_fn.lua",
        "if h[1] or not (h[2] or mine) then return false end",
        "if not (h[2] or mine) then return false end",
        "tests/test_cache_scopes.py::test_a_finished_job_is_never_superseded",
    ),
    Mutation(
        "a job that came late supersedes the newer one",
        "buildq/store/lua/supersede_fn.lua",
        "if theirs and (theirs > order or (theirs == order and newest > job_id)) then",
        "if false then",
        "tests/test_cache_scopes.py::test_a_job_reaching_a_worker_after_a_newer_one_is_superseded_itself",
    ),
    Mutation(
        "the submit does not supersede",
        "buildq/store/lua/submit.lua",
        "if supersede_key ~= '' then",
        "if false then",
        "tests/test_cache_scopes.py::test_a_newer_submit_cancels_the_queued_older_job_in_the_same_step",
    ),
    Mutation(
        "a fallback import does not count when the scope's own ref missed",
        "buildq/buildkit/phases.py",
        "    imported = any(v.completed is not None and not v.error for v in imports)",
        "    imported = all(v.completed is not None and not v.error for v in imports) and bool(imports)",
        "tests/test_cache_scopes.py::test_a_genuine_fallback_import_counts_as_imported_and_its_own_miss_is_no_error",
    ),
    Mutation(
        "a build waiting for the export lease lets its claim lapse",
        "buildq/engine/lifecycle.py",
        "if time.monotonic() - renewed >= s.lease_ttl_s / 3:  # the claim stays ours while it waits",
        "if False:",
        "tests/test_cache_scopes_worker.py::"
        "test_a_build_waiting_for_an_older_exporter_keeps_its_claim_then_exports_after_it",
        limit_s=25.0,  # the claim must outlive a lease TTL while an older build exports
    ),
    Mutation(
        "a supersede key may hold any character",
        "buildq/contract/job.py",
        'SUPERSEDE_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")',
        'SUPERSEDE_KEY_RE = re.compile(r"(?s).{1,400}")',
        "tests/test_cache_scopes.py::test_a_bad_scope_or_supersede_key_is_one_line_naming_the_field",
    ),
    Mutation(
        "i26: BUILDQ_ checked case-sensitively",
        "buildq/contract/grants.py",
        "return name.upper().startswith(NEVER_GRANTED_PREFIX)",
        "return name.startswith(NEVER_GRANTED_PREFIX)",
        "tests/test_untrusted_inprocess.py::test_buildq_variables_are_never_granted_in_any_case",
    ),
    Mutation(
        "i26: a folder holding /proc passes",
        "buildq/contract/grants.py",
        "if is_under(path, [root]) or is_under(root, [path]):",
        "if is_under(path, [root]):",
        "tests/test_untrusted_inprocess.py::test_the_worker_checks_refuse_pseudo_filesystems_with_no_roots",
    ),
    Mutation(
        "i26: the Dockerfile's resolved folder unchecked",
        "buildq/engine/lifecycle.py",
        'check_not_pseudo("dockerfile", job.dockerfile, os.path.dirname(real_dockerfile))',
        "pass",
        "tests/test_untrusted_inprocess.py::test_the_worker_checks_refuse_pseudo_filesystems_with_no_roots",
    ),
    Mutation(
        "i26: ssh:// git contexts ungated",
        "buildq/engine/lifecycle.py",
        "    if job.is_git:\n        check_git_transport",
        "    if job.is_git and False:\n        check_git_transport",
        "tests/test_untrusted_inprocess.py::test_ssh_git_contexts_only_when_granted",
    ),
    Mutation(
        "i26: unicode letters in tags",
        "buildq/contract/reference.py",
        "    re.ASCII,",
        "    0,",
        "tests/test_untrusted_inprocess.py::test_a_tag_with_a_non_ascii_letter_is_refused_naming_it",
    ),
    Mutation(
        "i26: output cut without holding a secret back",
        "buildq/engine/attemptlog.py",
        "at = self._cut(bytes(buf), len(buf))",
        "at = len(buf)",
        "tests/test_untrusted_inprocess.py::test_a_secret_across_the_16k_cut_of_a_long_line_is_masked_whole",
    ),
    Mutation(
        "i26: the record's tail cut through a secret",
        "buildq/buildkit/progress.py",
        "                keep = safe_cut(bytes(partial), keep)",
        "                pass",
        "tests/test_untrusted_inprocess.py::test_a_secret_across_the_16k_cut_of_a_long_line_is_masked_whole",
    ),
    Mutation(
        "i26: URL userinfo not masked",
        "buildq/contract/job.py",
        "    if sep and at and userinfo:",
        "    if False:",
        "tests/test_untrusted_inprocess.py::test_url_userinfo_and_query_values_are_what_a_context_hides",
    ),
    Mutation(
        "i26: Go's %q form not masked",
        "buildq/engine/redact.py",
        "    forms.add(go)\n",
        "",
        "tests/test_untrusted_inprocess.py::test_quoted_forms_of_a_value_are_masked",
    ),
    Mutation(
        "i26: pid file follows a symlink",
        "buildq/launchers/local.py",
        "flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW",
        "flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC",
        "tests/test_untrusted_inprocess.py::test_a_pid_file_never_follows_a_planted_symlink",
    ),
    Mutation(
        "i26: state folder owner unchecked",
        "buildq/launchers/local.py",
        "elif info.st_uid != os.geteuid():",
        "elif False:",
        "tests/test_untrusted_inprocess.py::test_a_state_folder_must_be_the_workers_own",
    ),
    Mutation(
        "i26: the worker refuses no state folder",
        "buildq/celeryapp/worker.py",
        "    check_state_folder(settings)\n",
        "",
        "tests/test_untrusted_producer.py::test_the_worker_refuses_a_state_folder_another_user_owns",
        60.0,
    ),
    Mutation(
        "i26: inspect shows the arguments themselves",
        "buildq/celeryapp/task.py",
        "return super().info(safe=True)",
        "return super().info(safe=safe)",
        "tests/test_untrusted_producer.py::test_the_task_shows_the_job_id_and_tags_never_the_job_whatever_the_headers",
        60.0,
    ),
    Mutation(
        "i26: the producer's ignore_result believed",
        "buildq/celeryapp/task.py",
        '"ignore_result": ignore}',
        '"ignore_result": self._request_dict.get("ignore_result", ignore)}',
        "tests/test_untrusted_producer.py::test_the_task_shows_the_job_id_and_tags_never_the_job_whatever_the_headers",
        60.0,
    ),
    Mutation(
        "i26: log bytes uncapped",
        "buildq/engine/lifecycle.py",
        "max_bytes=self.settings.log_max_bytes,",
        "max_bytes=0,",
        "tests/test_untrusted_producer.py::test_a_builds_log_is_capped_in_bytes_and_says_so",
        60.0,
    ),
    Mutation(
        "i26 case 1: no time limit on a launched build",
        "buildq/engine/runner.py",
        "handles.append(spec.scheduler.later(spec.timeout_s, lambda: stopper.stop(TIMEOUT)))",
        "pass",
        "tests/test_untrusted_producer.py::test_forged_times_run_each_build_watched_within_its_slot_and_limit",
        60.0,
    ),
    Mutation(
        "i26 case 2: unknown message fields accepted",
        "buildq/contract/wire.py",
        "    elif unknown:\n",
        "    elif unknown and False:\n",
        "tests/test_untrusted_producer.py::test_forged_attempts_and_phases_are_not_believed",
        60.0,
    ),
    Mutation(
        "i26 case 3: a reject ignores the delivery",
        "buildq/store/lua/reject.lua",
        "if h.delivery and h.delivery ~= delivery then return 0 end",
        "",
        "tests/test_untrusted_producer.py::test_an_invalid_message_with_another_jobs_id_leaves_that_job_alone",
        60.0,
    ),
]


def run(mutation: Mutation, tree: Path) -> tuple[str, float]:
    target = tree / mutation.path
    original = target.read_text()
    if mutation.old not in original:
        return "NOT APPLICABLE (the guard's text moved: update the mutation)", 0.0
    target.write_text(original.replace(mutation.old, mutation.new, 1))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout", "60",
             "--basetemp", str(tree / ".pytest-tmp"), mutation.test],
            cwd=tree, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        seconds = time.monotonic() - started
        caught = done.returncode != 0 and "failed" in done.stdout
        return ("caught" if caught else "SURVIVED"), seconds
    except subprocess.TimeoutExpired:
        return "TIMED OUT (the test hung: make it fail instead)", time.monotonic() - started
    finally:
        target.write_text(original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the mutations whose name contains this text")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    tree = Path(tempfile.mkdtemp(prefix="buildq-mutations-"))
    try:
        for part in ("buildq", "tests", "pyproject.toml"):
            source = ROOT / part
            if source.is_dir():
                shutil.copytree(source, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, tree / part)
        failed = False
        print(f"{'mutation':50} {'verdict':10} {'seconds':>7}  test")
        for mutation in chosen:
            verdict, seconds = run(mutation, tree)
            slow = verdict == "caught" and seconds > mutation.limit_s
            failed |= verdict != "caught" or slow
            mark = f"{verdict}{' (slow)' if slow else ''}"
            print(f"{mutation.name:50} {mark:10} {seconds:7.1f}  {mutation.test.split('::')[1]}")
        sys.exit(1 if failed else 0)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
