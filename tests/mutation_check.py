"""Mutation check: does the suite catch real bugs? Each mutation below is a deliberate bug, one edit of the
library's source. The script applies them one at a time, runs the tests that should catch it, records
whether they failed and which test failed first, and restores the file (also on Ctrl-C).

    python tests/mutation_check.py            # every mutation; prints a Markdown table, exit 1 if any survives
    python tests/mutation_check.py 3 7        # only these

Before the mutations, the tests named here run once on the unchanged source and must pass, so a failure
seen later is the mutation's doing. A mutation is "caught" when pytest exits 1: a test failed, or its
fixture did (exit 2, a collection error, would mean the edit broke the import, which counts for nothing). The tests named per mutation are
a subset of the suite, so a caught mutation fails `make test` too.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    file: str            # relative to the repository root
    old: str             # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]
    what: str


MUTATIONS = [
    # --- evaluate/ ------------------------------------------------------------------------------------
    Mutation("imagegen/evaluate/metrics.py",
             "value = (mu1 - mu2).square().sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross",
             "value = (mu1 - mu2).square().sum()",
             ("tests/test_metrics.py",), "FD without the trace term"),
    Mutation("imagegen/evaluate/metrics.py",
             "mmd = (kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off - 2 * kxy.mean()",
             "mmd = kxx.mean() + kyy.mean() - 2 * kxy.mean()",
             ("tests/test_metrics.py",), "KID biased: the kernel's diagonal kept"),
    Mutation("imagegen/evaluate/metrics.py",
             "recall = (_inside_counts(real, fake, _kth_nn_radius(fake, k)) > 0).float().mean()",
             "recall = (_inside_counts(fake, real, _kth_nn_radius(real, k)) > 0).float().mean()",
             ("tests/test_metrics.py",), "recall computed as precision"),
    Mutation("imagegen/evaluate/analyse.py",
             "idx_c[torch.argsort(realism[idx_c], descending=True)]",
             "idx_c[torch.argsort(realism[idx_c], descending=False)]",
             ("tests/test_evaluate.py",), "analyse --keep keeps the worst share"),
    Mutation("imagegen/evaluate/run_eval.py",
             "    seeds = list(range(n))\n",
             "    seeds = list(range(1, n + 1))\n",
             ("tests/test_evaluate.py",), "evaluate draws seeds 1..n, not the 0..n-1 it stamps"),
    Mutation("imagegen/evaluate/synth.py",
             "net = fit_classifier(synth, cfg, log=None)",
             "net = fit_classifier(type(synth)(images=synth.images, labels=synth.labels[torch.randperm(len(synth))], "
             "classes=synth.classes, name=synth.name, source=synth.source), cfg, log=None)",
             ("tests/test_evaluate.py",), "TSTR trains on the synthetic images with their labels shuffled"),
    Mutation("imagegen/evaluate/evaluator.py",
             "def run_data(run, data: str | None = None, split: str = \"test\") -> DataConfig:",
             "def run_data(run, data: str | None = None, split: str = \"train\") -> DataConfig:",
             ("tests/test_evaluate.py",), "runs are measured against the train split, not the test split"),
    # --- checkpoint.py and files.py (its manifests) ------------------------------------------------------
    Mutation("imagegen/serve/guard.py",
             '                csp = FILES_CSP if scope["path"].startswith("/files/") else PAGE_CSP',
             "                csp = PAGE_CSP",
             ("tests/test_guard.py::test_run_files_are_sandboxed_and_the_page_has_a_policy",),
             "a run folder's HTML runs in the app's origin (no sandbox)"),
    Mutation("imagegen/serve/worker.py",
             "    if due is not None and time.monotonic() > due:\n        raise Late()",
             "    pass",
             ("tests/test_serve.py::test_work_past_its_deadline_stops_at_the_next_network_call",),
             "work past its deadline runs on to its end in the model thread"),
    Mutation("imagegen/serve/worker.py", "class Late(asyncio.TimeoutError):", "class Late(Exception):",
             ("tests/test_serve.py::test_a_stop_by_the_model_threads_own_deadline_check_is_503",),
             "a request stopped by the model thread's deadline check escapes the app instead of a 503"),
    Mutation("imagegen/serve/common.py",
             "        weight = max(1.0, (pixels or 0) / served.model.cfg.image_size ** 2) ** CANVAS_EXPONENT",
             "        weight = 1.0",
             ("tests/test_serve.py::test_an_inpaint_canvas_counts_as_its_pixels",), "an inpaint canvas costs one image"),
    Mutation("imagegen/serve/jobs.py",
             "    if final.is_dir() and counts_file.is_file():",
             "    if False:",
             ("tests/test_studio_train.py::test_the_same_zip_is_stored_once_and_only_the_newest_uploads_stay",),
             "the same zip uploaded twice is stored twice"),
    Mutation("imagegen/serve/jobs.py",
             "    prune(uploads, KEEP_UPLOADS, keep | {upload})",
             "    pass",
             ("tests/test_studio_train.py::test_the_same_zip_is_stored_once_and_only_the_newest_uploads_stay",),
             "uploads are never removed"),
    Mutation("imagegen/serve/jobs.py",
             "    job.watch(60 * minutes + GRACE_S)",
             "    pass",
             ("tests/test_studio_train.py::test_a_job_runs_below_the_server_and_is_killed_past_its_budget",),
             "a job past its budget is left running"),
    Mutation("imagegen/serve/app.py",
             "        stop_training()            # a training job ends with the server",
             "        pass",
             ("tests/test_studio_train.py::test_stopping_the_app_ends_its_job_without_the_linux_death_signal",),
             "a training job outlives a stopped server"),
    Mutation("imagegen/serve/jobs.py",
             "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)",
             "    pass",
             ("tests/test_studio_train.py::test_the_training_process_ends_with_the_server",),
             "a training job outlives a killed server"),
    Mutation("imagegen/serve/common.py",
             '    return re.sub(r"[\\x00-\\x1f\\x7f]", lambda m: repr(m.group())[1:-1], text)',
             "    return text",
             ("tests/test_text.py::test_the_api_takes_a_prompt_and_refuses_bad_ones",),
             "a newline in a prompt reaches the command header (a 500 after the work)"),
    Mutation("imagegen/serve/jobs.py",
             "        if clash := sorted(folders & set(names)):",
             "        if clash := sorted(set()):",
             ("tests/test_studio_train.py::test_unsafe_or_unbounded_zips_are_refused_and_write_nothing",),
             "zip members that are a file and a folder at once are unpacked (a 500)"),
    Mutation("imagegen/serve/training.py",
             '        out["error"] = out["error"].replace(f"{root}/", "")   # the log\'s paths, relative to RUNS_DIR',
             "        pass",
             ("tests/test_studio_train.py::test_upload_train_and_serve_the_new_run_and_a_failure_or_cancel_leaves_a_working_server",),
             "a failed job's error shows the server's absolute paths"),
    Mutation("imagegen/files.py",
             "        if sha256_file(p) != digest:\n",
             "        if False:\n",
             ("tests/test_checkpoint.py",), "the manifest's SHA-256 check skipped"),
    Mutation("imagegen/files.py",
             "        if not p.is_file():\n            raise CheckpointError(f\"{p}: listed in the manifest but missing\")\n",
             "",
             ("tests/test_checkpoint.py",), "a file listed in the manifest may be missing"),
    Mutation("imagegen/files.py",
             "    except FileNotFoundError:\n        raise CheckpointError(f\"{mpath}: missing (no weights saved in {folder} yet?)\") from None\n",
             "    except FileNotFoundError:\n        return {}\n",
             ("tests/test_checkpoint.py",), "a missing MANIFEST.json is accepted"),
    Mutation("imagegen/checkpoint.py",
             "obj = torch.load(path, map_location=\"cpu\", weights_only=True)",
             "obj = torch.load(path, map_location=\"cpu\", weights_only=False)",
             ("tests/test_checkpoint.py",), "torch.load without weights_only (pickled code runs)"),
    Mutation("imagegen/checkpoint.py",
             "            raise CheckpointError(f\"refusing to write {what}: tensor {name!r} holds NaN or Inf\")",
             "            pass",
             ("tests/test_checkpoint.py",), "non-finite weights are written"),
    Mutation("imagegen/checkpoint.py",
             "for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:",
             "for old in list_checkpoints(run_dir)[:-keep - 1] if keep > 0 else []:",
             ("tests/test_checkpoint.py",), "one checkpoint too many kept"),
    Mutation("imagegen/checkpoint.py",
             "        raise CheckpointError(f\"{file}: does not fit the model in config.json ({e})\") from None",
             "        raise",
             ("tests/test_checkpoint.py",), "weights that do not fit config.json end in a RuntimeError traceback"),
    # --- data/ ----------------------------------------------------------------------------------------
    Mutation("imagegen/data/folder.py",
             "                img = ImageOps.exif_transpose(img)\n",
             "",
             ("tests/test_data_paths.py",), "EXIF orientation dropped"),
    Mutation("imagegen/data/registry.py",
             "    if skipped and strict:",
             "    if skipped and strict and False:",
             ("tests/test_folder.py",), "--strict ignored"),
    Mutation("imagegen/data/download.py",
             "        if actual != sha256:",
             "        if False:",
             ("tests/test_download.py",), "downloads not checked against their SHA-256"),
    Mutation("imagegen/data/download.py",
             "        if expected_len is not None and received != expected_len:",
             "        if False:",
             ("tests/test_download.py",), "a truncated download is not reported as truncated (only its hash fails)"),
    Mutation("imagegen/data/registry.py",
             "    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)",
             "    w = torch.tensor([1 / 3, 1 / 3, 1 / 3]).view(1, 3, 1, 1)",
             ("tests/test_data_paths.py",), "RGB to gray by the channel mean, not luma"),
    Mutation("imagegen/data/dataset.py",
             "        if batch_size > len(self):",
             "        if False:",
             ("tests/test_data_paths.py",), "a batch larger than the dataset comes back short"),
    Mutation("imagegen/data/shapes.py",
             "    return torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(labels[:stop].astype(np.int64))",
             "    return torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(np.roll(labels[:stop], 1).astype(np.int64))",
             ("tests/test_conditional.py::TestOnTheUNet::test_samples_follow_their_labels[cvae]",),
             "the shapes dataset's labels are one image off"),
    Mutation("imagegen/data/idx.py",
             "        if head[0] != 0 or head[1] != 0:",
             "        if False:",
             ("tests/test_idx.py",), "an IDX file's magic number is not checked"),
    Mutation("imagegen/data/cifar.py",
             '                if pure.is_absolute() or ".." in pure.parts:',
             "                if pure.is_absolute():",
             ("tests/test_cifar.py",), "a CIFAR member named with '..' is not refused"),
    Mutation("imagegen/data/cifar.py",
             "    labels = records[:, spec.label_bytes - 1].astype(np.int64)      # CIFAR-100: the fine label",
             "    labels = records[:, 0].astype(np.int64)",
             ("tests/test_cifar.py",), "CIFAR-100 takes the coarse label for the fine one"),
    Mutation("imagegen/data/store.py",
             "        problems = [p for p in pool.map(verify, jobs) if p]",
             "        problems = []",
             ("tests/test_store.py",), "a store's hashes are not checked on open"),
    Mutation("imagegen/data/store.py",
             "            got = os.preadv(self.fd, [out[row]], i * per)",
             "            got = os.preadv(self.fd, [out[row]], i * per + per // 2)",
             ("tests/test_store.py",), "a store's batches read from the wrong offset"),
    Mutation("imagegen/data/prepare.py", '"scenes", "emoji", "captioned",', '"scenes", "captioned",',
             ("tests/test_emoji.py::test_a_prepared_store_keeps_the_held_out_split",),
             "a prepared emoji store has no test split (runs on it are measured on their training icons)"),
    Mutation("imagegen/data/prepare.py", 'for split in ("train", "test") if held_out else ("train",):',
             'for split in ("train",):', ("tests/test_store.py",),
             "data prepare --held-out writes no test split"),
    Mutation("imagegen/data/dataset.py",
             "        raw = self.images[index] if self.mapping is None else self.mapping.gather(index)",
             "        raw = self.images[index]",
             ("tests/test_store.py",), "store batches read through the memory map (resident memory grows)"),
    Mutation("imagegen/data/edmzip.py",
             "            labels = [table[n] for n in names]",
             "            labels = sorted(table[n] for n in names)",
             ("tests/test_store.py",), "an EDM zip's labels are not matched to their images"),
    # --- export, tensorboard ----------------------------------------------------------------------------
    Mutation("imagegen/export.py",
             "        if not diff <= tolerance:",
             "        if False:",
             ("tests/test_export.py",), "an export whose outputs differ from torch is kept"),
    Mutation("imagegen/models/distilled.py",
             "                x = x + self.net(x, t, y) / k",
             "                x = x + self.net(x, t, y)",
             ("tests/test_export.py",), "the distilled sampler graph takes whole steps, not 1/K"),
    Mutation("imagegen/progress.py",
             '            self.board.scalars(done, means | ({} if val_loss is None else {"validation": val_loss}), "loss")',
             '            self.board.scalars(done - 1, means | ({} if val_loss is None else {"validation": val_loss}), "loss")',
             ("tests/test_tboard.py",), "TensorBoard's losses are logged one step early"),
    # --- serve/ -----------------------------------------------------------------------------------------
    Mutation("imagegen/serve/common.py",
             "for d in range(1, RUN_SEARCH_DEPTH + 1)",
             "for d in range(1, RUN_SEARCH_DEPTH)",
             ("tests/test_serve.py::test_serve_command_finds_nested_runs_and_reports_broken_ones",),
             "runs at the deepest searched level are not served"),
    Mutation("imagegen/serve/app.py",
             "                if target.is_relative_to(folder) and target.is_file() and target.suffix in SERVED_SUFFIXES:",
             "                if target.is_file():",
             ("tests/test_serve.py::test_path_traversal_gets_404_and_no_content", "tests/test_serve.py::test_run_files_are_served_and_nothing_else"),
             "/files/ serves any file, inside the run or not"),
    Mutation("imagegen/serve/worker.py",
             "        if self.pending >= MAX_PENDING:\n            raise Busy()\n",
             "",
             ("tests/test_serve.py::test_overload_is_503_with_retry_after",), "no admission limit (never 503)"),
    Mutation("imagegen/serve/worker.py",
             "            return await asyncio.wait_for(future, DEADLINE_S)",
             "            return await future",
             ("tests/test_serve.py::test_a_request_past_the_deadline_is_503_and_the_server_recovers",),
             "generate requests have no deadline"),
    Mutation("imagegen/serve/common.py",
             "            if log:\n                log(f\"not serving {folder}: {reason}\")",
             "            pass",
             ("tests/test_serve.py::test_serve_command_finds_nested_runs_and_reports_broken_ones",),
             "broken runs are left out silently"),
    Mutation("imagegen/serve/guard.py",
             '        if "*" not in policy.hosts and name not in policy.hosts and not is_address(name):',
             "        if False:",
             ("tests/test_guard.py::test_a_foreign_host_is_403_on_every_route",), "any Host header is served (DNS rebinding)"),
    Mutation("imagegen/serve/guard.py",
             "        if policy.needs_token(method, path):",
             "        if False:",
             ("tests/test_guard.py::test_an_upload_without_the_token_is_refused_before_its_body_is_read",),
             "no token check in the gate (uploads are read, then refused)"),
    Mutation("imagegen/serve/guard.py",
             '            if site == "cross-site":',
             "            if False:",
             ("tests/test_guard.py::test_a_cross_site_post_is_refused",), "a POST marked cross-site gets through"),
    Mutation("imagegen/serve/guard.py",
             '                if state["read"] > cap:',
             "                if False:",
             ("tests/test_guard.py::test_bodies_over_their_route_cap_are_413_and_stop_being_read",),
             "a chunked body is not counted against the cap"),
    Mutation("imagegen/serve/guard.py",
             "                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))",
             "                message = await receive()",
             ("tests/test_guard.py::test_a_body_not_sent_within_its_deadline_is_408",), "no body-read deadline"),
    Mutation("imagegen/serve/guard.py",
             "        if self.in_flight >= MAX_IN_FLIGHT:",
             "        if False:",
             ("tests/test_guard.py::test_open_requests_are_capped",), "no cap on open requests"),
    Mutation("imagegen/files.py",
             '        if Path(name).is_absolute() or ".." in Path(name).parts or not (root / name).resolve().is_relative_to(root):',
             "        if False:",
             ("tests/test_served_runs.py::test_each_broken_run_is_skipped_with_its_reason_and_the_good_one_serves",),
             "a manifest may name files outside its folder"),
    Mutation("imagegen/checkpoint.py",
             "        if key in cfg and not isinstance(cfg[key], kind):",
             "        if False:",
             ("tests/test_served_runs.py::test_each_broken_run_is_skipped_with_its_reason_and_the_good_one_serves",),
             "config.json sections of the wrong type are not named"),
    Mutation("imagegen/checkpoint.py",
             "    if max_bytes is not None and need > max_bytes:",
             "    if False:",
             ("tests/test_served_runs.py::test_the_library_names_what_is_wrong",), "no cap on a loaded model's size"),
    # --- a family: gan.py -----------------------------------------------------------------------------
    Mutation("imagegen/models/gan.py",
             "    dy = torch.randint(-sh, sh + 1, (n, 1, 1), generator=gen, device=x.device)\n"
             "    dx = torch.randint(-sw, sw + 1, (n, 1, 1), generator=gen, device=x.device)",
             "    dy = torch.randint(-sh, sh + 1, (1, 1, 1), generator=gen, device=x.device).expand(n, 1, 1)\n"
             "    dx = torch.randint(-sw, sw + 1, (1, 1, 1), generator=gen, device=x.device).expand(n, 1, 1)",
             ("tests/test_families.py",), "DiffAugment translation: one shift for the whole batch"),
    Mutation("imagegen/models/gan.py",
             "                accept = coins < torch.sigmoid(f(d) - gamma)",
             "                accept = coins < 0.5",
             ("tests/test_families.py",), "DRS accepts at random, whatever the critic says"),
    Mutation("imagegen/models/gan.py",
             "        if truncation > 0:\n            z = z.clamp(-truncation, truncation)\n        with eval_mode(self):",
             "        with eval_mode(self):",
             ("tests/test_sample.py",), "--truncation ignored"),
    Mutation("imagegen/models/gan.py",
             "        return F.softplus(-real).mean() + F.softplus(fake).mean()",
             "        return F.softplus(real).mean() + F.softplus(-fake).mean()",
             ("tests/test_conditional.py::TestOnTheUNet::test_samples_follow_their_labels[cgan]",),
             "the discriminator's NS loss has its signs swapped (D learns backwards)"),
    # --- packed weights and cached tables: nets/layers.py, models/baseline.py ----------------------------
    Mutation("imagegen/nets/layers.py",
             "                and self.steps == _OPTIMIZER_STEPS[0] and self.key == key)",
             "                and self.key == key)",
             ("tests/test_batching.py",),
             "a packed weight kept across a fused optimizer step (a GAN's D step saw a stale generator)"),
    Mutation("imagegen/models/baseline.py",
             '        if getattr(self, "_cdf_key", None) != key:',
             '        if getattr(self, "_cdf_key", None) is None:',
             ("tests/test_families.py::test_random_baseline_samples_from_its_current_counts",),
             "the random baseline samples from the counts it first saw"),
    # --- the onnxruntime engine: engine.py -----------------------------------------------------------------
    Mutation("imagegen/runtime/engine.py",
             "    return (optimizer_steps(),) + tuple((t._version, t.data_ptr()) for t in tensors)",
             "    return tuple((t._version, t.data_ptr()) for t in tensors)",
             ("tests/test_engine.py::test_the_engine_exports_again_after_the_weights_change",),
             "the engine keeps its graph across a fused optimizer step (stale weights in onnxruntime)"),
    Mutation("imagegen/runtime/engine.py",
             "    return (optimizer_steps(),) + tuple((t._version, t.data_ptr()) for t in tensors)",
             "    return (optimizer_steps(),) + tuple(t.data_ptr() for t in tensors)",
             ("tests/test_engine.py::test_the_engine_exports_again_after_the_weights_change",),
             "the engine keeps its graph across an in-place change of a weight (load_state_dict, EMA)"),
    # --- latent mode and memorisation -------------------------------------------------------------------
    Mutation("imagegen/models/latent.py",
             'key = hashlib.sha256(f"{ae_sha256}:{data_sha256}".encode()).hexdigest()[:32]',
             'key = hashlib.sha256(f"{ae_sha256}".encode()).hexdigest()[:32]',
             ("tests/test_latent.py",), "the latent cache ignores which images it encoded"),
    Mutation("imagegen/models/latent.py",
             "    if cfg.autoencoder_sha256 and cfg.autoencoder_sha256 != sha:\n",
             "    if False:\n",
             ("tests/test_latent.py",), "a run resumes on an autoencoder that changed"),
    Mutation("imagegen/evaluate/memorisation.py",
             "RATIO = 1 / 3",
             "RATIO = 0.0",
             ("tests/test_evaluate.py",), "no sample is ever a near-copy"),
    # --- resuming on its own ------------------------------------------------------------------------------
    Mutation("imagegen/train.py",
             '        resume = "auto" if distributed.elastic_job() is not None else "never"',
             '        resume = "never"',
             ("tests/test_distributed.py::test_a_job_whose_rank_dies_is_restarted_by_torchrun_and_ends_as_an_uninterrupted_one",),
             "workers that torchrun restarts start a new run"),
    Mutation("imagegen/train.py",
             "            ckpt.start_over(found)\n",
             "            pass\n",
             ("tests/test_distributed.py::test_a_job_whose_rank_dies_is_restarted_by_torchrun_and_ends_as_an_uninterrupted_one",),
             "a job restarted before its first checkpoint keeps the dead attempt's log"),
    Mutation("imagegen/train.py",
             "        if has_checkpoint and newest is None:",
             "        if newest is None:",
             ("tests/test_train.py::test_resume_auto_continues_the_newest_run_of_the_same_config",),
             "--resume auto takes a folder without a checkpoint (another job's, just started)"),
    Mutation("imagegen/train.py",
             "        return {k: v for k, v in train.items() if k not in MAY_CHANGE_ON_RESUME}",
             '        return {k: v for k, v in train.items() if k != "steps"}',
             ("tests/test_train.py::test_resume_auto_continues_the_newest_run_of_the_same_config",),
             "--resume auto misses its run when the precision changed"),
    Mutation("imagegen/checkpoint.py",
             "    if len(kept) != len(lines):",
             "    if False:",
             ("tests/test_train.py::test_a_resumed_log_drops_the_lines_after_its_checkpoint",),
             "a resumed log keeps the steps logged after its checkpoint"),
    # --- a folder's held-out split -------------------------------------------------------------------------
    Mutation("imagegen/data/folder.py",
             "    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], \"big\") < share * 2**64",
             "    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], \"big\") <= share * 2**65",
             ("tests/test_folder.py::test_data_held_out_sets_a_share_of_a_folder_apart_by_file_name",),
             "data.held_out holds out twice its share"),
    Mutation("imagegen/data/folder.py",
             "    inside = Path(root).resolve()\n",
             "    inside = Path(\"/\")\n",
             ("tests/test_folder.py::test_data_held_out_sets_a_share_of_a_folder_apart_by_file_name",),
             "a folder's held-out split moves with the folder (hashes of absolute paths)"),
    Mutation("imagegen/data/registry.py",
             "channels=int(saved.get(\"channels\", 0)), held_out=float(saved.get(\"held_out\", 0)))",
             "channels=int(saved.get(\"channels\", 0)))",
             ("tests/test_evaluate.py::test_evaluate_works_on_a_folder_without_classes",),
             "evaluate compares a held-out run with its training images"),
    Mutation("imagegen/progress.py",
             "        held = load_data(replace(cfg.data, split=\"test\", limit=VAL_IMAGES))",
             "        held = load_data(replace(cfg.data, split=\"test\", limit=VAL_IMAGES, held_out=0.0))",
             ("tests/test_latent.py::test_a_folder_has_a_validation_loss_only_with_data_held_out",),
             "a folder's held-out share gets no validation loss"),
    # --- the studio's latent job ----------------------------------------------------------------------------
    Mutation("imagegen/serve/chain.py",
             "            process.terminate()\n",
             "            pass\n",
             ("tests/test_studio_train.py::test_the_training_process_ends_with_the_server",),
             "a latent job's autoencoder outlives the server"),
    Mutation("imagegen/serve/jobs.py",
             "    if latent and family not in LATENT_FAMILIES:",
             "    if False:",
             ("tests/test_studio_train.py::test_a_latent_job_trains_an_autoencoder_then_the_model_on_its_latents",),
             "the studio takes a latent job for a family that learns no latents"),
]


def run_tests(tests: tuple[str, ...]) -> tuple[int, str, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    return r.returncode, r.stdout + r.stderr, time.perf_counter() - t


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - |$)", output, re.M)
    return m.group(1) if m else "?"


def main(argv: list[str]) -> int:
    chosen = [int(a) for a in argv] if argv else list(range(1, len(MUTATIONS) + 1))
    for i in chosen:
        m = MUTATIONS[i - 1]
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1:
            print(f"mutation {i} ({m.what}): its text occurs {count} times in {m.file}; fix the table", file=sys.stderr)
            return 2
    tests = tuple(sorted({t for i in chosen for t in MUTATIONS[i - 1].tests}))
    code, out, took = run_tests(tests)
    if code != 0:
        print(f"the unchanged source fails these tests ({first_failure(out)}); nothing to measure\n{out[-3000:]}", file=sys.stderr)
        return 2
    print(f"unchanged source: {len(tests)} test selections pass ({took:.0f} s)\n")
    print("| # | file | mutation | caught | by the first failing test |")
    print("|---|---|---|---|---|")
    survivors = 0
    for i in chosen:
        m = MUTATIONS[i - 1]
        path = ROOT / m.file
        original = path.read_text()
        try:
            path.write_text(original.replace(m.old, m.new))
            code, out, took = run_tests(m.tests)
        finally:
            path.write_text(original)
        failed = code == 1          # a test failed or errored in its set-up; 2 would be a collection error
        survivors += not failed
        by = first_failure(out) if failed else ("collection error, not a test failure" if code not in (0, 1) else "-")
        print(f"| {i} | {m.file.removeprefix('imagegen/')} | {m.what} | {'yes' if failed else 'NO'} | `{by}` ({took:.0f} s) |",
              flush=True)
    print(f"\n{len(chosen) - survivors} of {len(chosen)} mutations caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
