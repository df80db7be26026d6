"""Every metric a training run logs (metrics.jsonl, TensorBoard, W&B), with its meaning.

`METRICS` names the fixed ones; `PATTERNS` the families whose names carry a part (a reward
source, a rejection option, a phase). `describe(name)` finds either; a test checks that every
metric the end-to-end runs log is described here, and the docs' metric reference is generated
from this module.
"""

from __future__ import annotations

import re

METRICS: dict[str, str] = {
    # the batch (learner/step_metrics.py; TRL's names where TRL has one)
    "reward": "Mean training reward of the step's trained responses (after the learner's normalisation).",
    "reward_std": "Standard deviation of those rewards.",
    "frac_reward_zero_std": "Share of prompt groups whose responses all got the same reward (no signal for a group estimator).",
    "objective/kl": "Mean per-response sum of the KL estimate to the reference.",
    "objective/entropy": "Mean per-response sum of −log π_old of the sampled tokens.",
    "objective/non_score_reward": "Mean per-response −β·KL (the KL part of the token rewards).",
    "objective/rlhf_reward": "Mean score plus non-score reward.",
    "objective/scores": "Mean score.",
    "completions/mean_length": "Mean number of trained response tokens.",
    "completions/clipped_ratio": "Share of responses cut at rollout.max_response_tokens.",
    "val/num_eos_tokens": "Responses that ended with EOS (or a stop string).",
    "val/ratio": "Mean π_θ/π_old over trained tokens (all micro-batches, minibatches, epochs).",
    "val/ratio_var": "Variance of that ratio.",
    "val/clipfrac_avg": "Share of tokens whose value loss was clipped (None without a critic).",
    "rollout/logprob_diff": "Mean |log π_old − log π_engine| per token (learner against engine).",
    "rollout/logprob_diff_same_version": "The same over tokens the engine generated with the learner's own version (the mismatch guard reads it).",
    # the update
    "loss/policy_avg": "Mean policy loss per minibatch.",
    "loss/value_avg": "Mean value loss per minibatch (None without a critic).",
    "policy/approxkl_avg": "Mean ½(log π_θ − log π_old)² per token.",
    "policy/clipfrac_avg": "The policy loss's clip fraction (its pg_clipfrac; 0 for losses without one).",
    "policy/entropy_avg": "Mean policy entropy per trained token.",
    "learner/grad_norm": "Policy gradient norm before clipping (mean over minibatches; NaN for a skipped step).",
    "learner/kl_coef": "The KL coefficient β used this step.",
    "learner/lr": "Policy learning rate after the step.",
    "learner/skipped_steps": "Optimizer steps skipped for a non-finite loss or gradient, cumulative.",
    "learner/padding_fraction": "Share of padded positions in the learner's micro-batches.",
    "learner/version": "Policy version after the step.",
    "learner/updated": "1 when the step made an update, 0 when every group was dropped.",
    # the fleet
    "rollout/num_samples": "Responses generated for the step.",
    "rollout/complete_groups": "Prompts with all their samples.",
    "rollout/num_workers": "Rollout workers after the step.",
    "rollout/min_version": "Lowest policy version a worker reports after the push.",
    "rollout/max_version": "Highest policy version a worker reports after the push.",
    "rollout/policy_version": "Policy version that generated the step's first record.",
    "rollout/tokens_per_s": "Generated tokens per second of the engines' own time.",
    "rollout/redispatched": "Prompt groups sent to another worker after a failure, cumulative.",
    "rollout/recovered": "Worker recoveries, cumulative.",
    "rollout/replaced": "Workers replaced by new ones, cumulative.",
    "rollout/scale_requested": "Rollout workers a scale request asked for (rlfleet scale, Trainer.scale_rollout), at the "
                               "step boundary that took it.",
    "rollout/scale_refused": "1 when that request was refused (the cluster lacks the resources; the decision's reason "
                             "names them), else 0.",
    "rollout/lost_workers": "Workers set aside because the cluster had no room to restart them (their node lost), "
                            "cumulative; each rejoins when it is back.",
    "rollout/workers_down": "Workers set aside now (counted in rollout/num_workers, given no work until back).",
    "rollout/resynced": "Restarted workers re-synced to the current weights, cumulative.",
    "rollout/sleep_freed_mb": "Colocated mode: the memory the engines freed when put to sleep before the learner's phase (the least of any worker; resident memory on a CPU, allocated GPU memory on a GPU; absent where the backend does not measure it).",
    "rollout/autoscale_target": "rollout.autoscale: the fleet size decided before this step (the signal: the learner's wait for rollouts and the engines' idle share; the reason is logged).",
    "rollout/autoscale_pending": "rollout.autoscale: 1 when the fleet should grow but the cluster lacks room; asked of Ray's autoscaler, it grows when a node offers the resources.",
    "rollout/autoscale_refused": "rollout.autoscale: 1 when the fleet should grow, the cluster lacks room and Ray's autoscaler could not be asked.",
    "learner/offloaded_mb": "learner.offload: the parameters, gradients, buffers and optimizer state moved to host memory after the push (rank 0).",
    "rollout/timeouts": "Generate calls cut at rollout.generate_timeout_s, cumulative.",
    "rollout/dropped_prompts": "Prompts dropped as empty or too long (rollout.on_bad_prompt: drop).",
    "rollout/staleness_mean": "Mean learner version − record version (the overlapped loop).",
    "rollout/staleness_max": "Largest staleness trained on.",
    "rollout/refused_stale": "Records refused as older than rollout.max_staleness.",
    "rollout/scoring_parts": "Scoring calls the step's batch was scored in (streaming, overlapped loop).",
    "rollout/interrupted": "Requests a push interrupted and continued on new weights (partial rollouts).",
    "rollout/extra_batches": "Extra batches generated by dynamic sampling.",
    "rollout/filtered_groups": "Uninformative groups left out by dynamic sampling.",
    # rewards and services
    "reward/unscorable": "Responses in groups dropped as unscorable.",
    "reward/baseline_unscorable": "ReMax greedy responses that could not be scored (baseline 0).",
    "services/retries": "Reward and reference calls made again after their actor died, cumulative.",
    # evaluation
    "eval/reward": "Mean training reward of greedy responses to the held-out prompts (the proxy).",
    "eval/unscorable": "Held-out responses the training reward could not score.",
    "eval/reward_model": "Mean raw reward-model score of the held-out responses.",
    "eval/gold": "Mean gold-checker score of the held-out responses.",
    "eval/gold_unscorable": "Held-out responses the gold checker could not score.",
    "eval/mean_length": "Mean held-out response length in tokens.",
    "eval/num_prompts": "Held-out prompts evaluated.",
    "eval/success": "Share of held-out episodes solved (multi-turn).",
    "eval/turns": "Mean turns per held-out episode (multi-turn).",
    "eval/tool_error_rate": "Share of held-out tool calls that failed (multi-turn).",
    "eval/tool_calls": "Mean tool calls per held-out episode (multi-turn).",
    "eval/observation_tokens": "Mean observation tokens per held-out episode (multi-turn).",
    "eval/restarts": "Held-out episodes re-run after their environment host died (multi-turn).",
    # episodes
    "episode/turns": "Mean turns per episode.",
    "episode/tool_error_rate": "Share of tool calls that failed.",
    # timing
    "timing/step": "Seconds of the whole step.",
    "timing/generate_busy": "The engines' own generation time (the longest call of each batch).",
}

STAGE_METRICS: dict[str, str] = {
    "loss": "The stage's training loss (SFT: token cross-entropy; RM: Bradley–Terry (+ lm_coef·LM); DPO).",
    "lm_loss": "The reward model's language-model regulariser on the chosen answers (rm.lm_coef).",
    "lr": "The stage's learning rate.",
    "accuracy": "RM and DPO: pairwise accuracy (chosen above rejected).",
    "margin": "RM: mean score margin chosen − rejected.",
    "token_accuracy": "SFT: held-out next-token accuracy on the responses.",
}
"""The supervised stages' metrics (run_dir/<stage>/metrics.jsonl), besides held-out numbers
under before/… and after/…."""

PATTERNS: dict[str, str] = {
    r"(before|after)/[a-z_/]+": "A supervised stage's held-out number before or after training (accuracy per "
                                "kind of negative, gold, token accuracy).",
    r"timing/[a-z_]+": "Seconds of one phase of the step (generate, score, reward, reference, old_logprobs, train, "
                       "push, baselines, extra_batches, wait, …).",
    r"reward/unscorable/.+": "Responses the named reward source could not score this step.",
    r"reward/logs/.+": "Mean of a number a reward function returned beside its value (a verl-style dict's other "
                       "keys, OpenRLHF's extra_logs), over the step's scored responses: reward/logs/<component>/<key>.",
    r"rollout_corr/[a-z0-9_]+": "Rollout correction: off-policy, importance-weight and rejection statistics "
                                "(docs/algorithms/rollout-correction.md).",
    r"episode/[a-z_]+": "Multi-turn episode statistics.",
}


def describe(name: str) -> str | None:
    """The meaning of metric `name`, or None when it is not described."""
    if name in METRICS:
        return METRICS[name]
    if name in STAGE_METRICS:
        return STAGE_METRICS[name]
    for pattern, meaning in PATTERNS.items():
        if re.fullmatch(pattern, name):
            return meaning
    return None
