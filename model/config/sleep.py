"""Sleep: consolidation (Knowledge Seeding, Learning to Imitate), rehearsal, dreaming, the dream gate and policy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from model.config.base import Section


REHEARSAL_PROMPT = (
    '{examples}Write one short, realistic example of a message a user might write whose category is "{label}". '
    "Reply with the message only."
)
REHEARSAL_SHOT = 'Example of "{label}": {text}\n'  # rehearsal.shots > 0: current-period examples first


class RehearsalConfig(Section):
    """Rehearsal inside sleep: dreamed inputs of every earlier task join consolidation's data D (model/sleep/rehearsal.py)."""

    enabled: bool = Field(True, description="Dream about every earlier task and distil the old model's answers on "
                          "those dreams into the new expert (false: consolidation sees the current period only).")
    per_label: int = Field(4, ge=1, le=64, description="Dreamed inputs per label of every earlier task.")
    prompt: str = Field(REHEARSAL_PROMPT, description="Dream prompt; {label} is the label's name, {examples} the "
                        "shots (optional).")
    shot: str = Field(REHEARSAL_SHOT, description="One shot: a labelled example of the current period ({text}, {label}).")
    shots: int = Field(0, ge=0, le=32, description="Current-period examples shown before each dream prompt, so "
                       "dreams of earlier tasks come in the style of real inputs (0: the label alone).")
    chat: bool = Field(True, description="Wrap the prompt in the model's chat template (when it has one).")
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0, le=5.0)
    top_p: float = Field(0.95, gt=0, le=1.0)
    random_expert: bool = Field(True, description="Dream mode while dreaming: every router also activates a random expert.")
    batch_size: int = Field(8, ge=1, description="Dreamed old-task sequences per distillation step (beside the batch).")
    steps: int = Field(0, ge=0, le=10_000, description="Steps on the rehearsal dreams alone after the copy and any "
                       "distillation: the old model teaches the new expert its answers on earlier tasks' dreams "
                       "(0: none; with consolidation.steps 0, the copy is then corrected on old tasks only).")
    anchor_current: bool = Field(True, description="During those steps, also keep the model's answers on this "
                                 "period's prompts (consolidation.samples_per_prompt teacher samples each; false: the "
                                 "old tasks alone, which taught the new expert to withhold the new labels: "
                                 "docs/results/issue13/dev-rehearsal-steps/).")
    weight: float = Field(1.0, ge=0, le=100.0, description="Weight of the old-task distillation term.")
    all_positions: bool = Field(False, description="Distil the old model on every token of a dreamed input, not only "
                                "on its label (false: the label's tokens; true lost old tasks on the development run).")
    min_chars: int = Field(8, ge=1, description="Check: shorter dreams are rejected.")
    near_duplicate_threshold: float = Field(90, ge=0, le=100, description="Check: rapidfuzz ratio at which a dream "
                                            "repeats an earlier one of its label (or is just the label's name).")

    @model_validator(mode="after")
    def _steps_need_dreams(self) -> "RehearsalConfig":
        if self.steps > 0 and not self.enabled:
            raise ValueError(f"steps {self.steps} trains on the rehearsal dreams, but enabled is false: no dream is "
                             "written (set steps 0, or enabled true)")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("prompt must contain {label}")
        return v


class ConsolidationConfig(Section):
    """Sleep stage 1: Knowledge Seeding of level l-1 into a new expert of level l (docs/design.md §2)."""

    enabled: bool = Field(
        True, description="Consolidate at every sleep (false: the levels keep what they learned, CMS without sleep)."
    )
    expand: bool = Field(
        True, description="Parameter expansion: consolidate into a newly unlocked expert of the slower level "
        "(false: train the slower level's newest existing expert in place, the 'no expansion' ablation).",
    )
    init: Literal["zero", "copy"] = Field(
        "zero", description="How the new expert starts: zero (B = 0, the paper's expansion: the model is unchanged) "
        "or copy (as the faster level's expert that learned most, model.sleep.consolidation.seed_expert; distillation "
        "then corrects it). params.yaml sets copy: chosen on development states by a rule set before the runs (the "
        "current task's drop from wake to consolidation 0.074 -> 0.048 over 10 cases; "
        "docs/results/issue13/dev-consolidation-data/); zero: method zero_start.",
    )
    prompt_buffer_size: int = Field(64, ge=1, description="Wake prompts kept for sleep (seeded sample).")
    samples_per_prompt: int = Field(
        1, ge=1, description="Teacher samples per buffered prompt (the data D). params.yaml sets 2: chosen on "
        "development states by a rule set before the runs (the current task's drop from wake to consolidation 0.064 -> 0.040 over 10 cases; "
        "docs/results/issue13/dev-consolidation-fidelity/); 1: method one_teacher_sample.",
    )
    steps: int = Field(
        40, ge=0, description="Optimiser steps on the new expert. 0: the copy alone (init copy, with expansion): the "
        "new expert is the faster level's expert, no teacher is sampled and nothing is distilled; the comparisons' "
        "budget in params.yaml sets 0, chosen on development states by a rule set before the runs (the current "
        "task's drop from wake to consolidation 0.098 -> -0.002 over 10 cases; docs/results/issue13/dev-copy-steps/); "
        "32 after the copy: method copy_distilled.",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per distillation step.")
    lr: float = Field(3e-3, gt=0, le=1.0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (jsd only).")
    on_policy_fraction: float = Field(
        0.5, ge=0, le=1, description="lambda: share of distillation batches sampled from the student."
    )
    alpha: float = Field(0.8, ge=0, le=1, description="L_KS = alpha * distillation - (1-alpha) * E[reward].")
    gamma: float = Field(0.5, ge=0, le=1, description="r = gamma * r_sem + (1-gamma) * r_abs (eq. 3).")
    semantic_threshold: float = Field(0.8, ge=-1, le=1, description="Cosine at which r_sem = 1.")
    z0: int = Field(32, ge=0, description="Levenshtein threshold of r_abs (characters, eq. 4).")
    lti_prefixes: int = Field(4, ge=1, description="Teacher sequences cut per step for Learning to Imitate.")
    lti_group_size: int = Field(4, ge=2, description="Student continuations per prefix (group for advantages).")
    max_new_tokens: int = Field(12, ge=1)
    temperature: float = Field(1.0, ge=0, le=5.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1.0)
    grad_clip: float = Field(1.0, gt=0)
    rehearsal: RehearsalConfig = Field(default_factory=RehearsalConfig)
    merge_when_full: bool = Field(
        True, description="When the slower level has no free slot, merge its two oldest consolidated experts into "
        "one (layer-wise distillation) so the sleep still has a slot (false: NoFreeSlotError).",
    )
    merge_steps: int = Field(60, ge=1, description="Adam steps of a merge (per layer, on the experts' own inputs).")
    merge_pair: Literal["oldest", "same_period"] = Field(
        "same_period", description="Which two read-only experts a full level merges. oldest: the two oldest. same_period: "
        "the oldest two that hold the same period (a kept dream expert and its period's consolidated one, "
        "dream.keep_dreams_in slow), else the two oldest: prototype routing turns on an expert for the inputs of its "
        "period and later ones, so a same-period merge leaves every input with the experts it had, where merging two "
        "periods' experts gives the older period's inputs the younger one's expert too. Chosen on development streams by "
        "a rule set before the runs (docs/results/issue13/dev-same-period-merge/); oldest: method oldest_merge.",
    )
    merge_in_view: bool = Field(
        False, description="With prototype routing: a merge reads each of its prompts in the view of the period it "
        "routes to, as the model answers it, and fits the merged expert there to the pair's experts that fire in "
        "that view only (an older period's inputs never saw the younger expert), leaving out prompts of periods the "
        "merged expert never answers (model/memory/merging.py; method merge_in_view). false: every prompt with every "
        "expert on, fitted to the pair's sum.",
    )
    merge_start: Literal["larger", "both"] = Field(
        "larger", description="Where a merge's fit starts in each CMS layer (model/memory/merging.py: fit_sum). "
        "larger: from the expert whose gated output is larger (an expert gated off everywhere gets no gradient). "
        "both: also the same steps from the other expert, keeping the fit with the lower error on the merge's "
        "inputs (twice the merge's fitting time; method merge_both_starts).",
    )
    state_dir: str = Field("state/consolidated", description="Model state after consolidation (input of dreaming).")
    dreams_dir: str = Field("dreams/consolidation", description="Sleep data per period (parquet).")
    metrics_dir: str = "metrics/consolidation"

    @model_validator(mode="after")
    def _copy_alone(self) -> "ConsolidationConfig":
        if self.steps == 0 and (self.init != "copy" or not self.expand):
            raise ValueError("steps 0 keeps the copy of the faster level's expert as the new expert: it needs init "
                             f"'copy' and expand true (got init '{self.init}', expand {str(self.expand).lower()}); "
                             "without them the sleep would free the faster level and keep nothing of it")
        return self


SEAL_IMPLICATIONS = (
    "Let's read the following passage and produce a list of implications derived directly or indirectly "
    "from the content.\n\n{title}\n{context}\n\nImplications:\n"
)


class DreamGateConfig(Section):
    """Data checks a dream must pass to be promoted (Great Expectations suite, docs/design.md §3 step 5)."""

    min_tokens: int = Field(8, ge=1, description="Shorter dreams are degenerate.")
    max_tokens: int = Field(512, ge=1)
    near_duplicate_threshold: float = Field(
        90.0, ge=0, le=100, description="rapidfuzz ratio to an earlier dream of the same context that marks a near-duplicate."
    )
    copy_threshold: float = Field(
        95.0, ge=0, le=100, description="rapidfuzz partial_ratio to the context that marks a verbatim copy."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "DreamGateConfig":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self


class DreamPolicyConfig(Section):
    """The dream policy (issue #14; docs/design.md §3): the generator's own LoRA adapter on the base model.

    It is on only while dreams are sampled and while ReST-EM trains it; the memory levels that
    answer questions never see it. It is part of the state (``dream_policy.*``, model/sleep/dream_policy.py),
    carried from sleep to sleep, so what ReST-EM taught the generator in one sleep writes the next
    sleep's dreams. A fresh policy (B = 0) samples exactly as the model without it.
    """

    enabled: bool = Field(True, description="Dreams come from the policy and ReST-EM trains it (false: dreams come "
                          "from the memory model and ReST-EM trains where dream.train_into says, the method "
                          "no_dream_policy).")
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                               description="Linear layers of every decoder layer that carry the adapter.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of a ReST-EM update of the policy.")
    source: str | None = Field(None, description="A trained policy directory (dream_policy.json + "
                               "dream_policy.safetensors) a fresh state starts from; null: a fresh policy.")


class PolicyTrainingConfig(Section):
    """Training the dream policy by ReST-EM over rounds on a pool of passages (issue #14, as SEAL does).

    Each round the current policy dreams about every training passage, every dream is tried in
    isolation (reward 1 if it raises the passage's tau), and the policy is fine-tuned on the rewarded
    (prompt -> dream) pairs of the round. The pool must not share a passage with the evaluation.
    """

    passages: str = Field("data/raw/squad/squad_train_seal100.json", description="SQuAD-format training "
                          "passages, relative to the project root (never the evaluation passages).")
    n_passages: int = Field(12, ge=1, description="Passages of the pool, from offset on.")
    offset: int = Field(0, ge=0)
    rounds: int = Field(3, ge=1, description="ReST-EM rounds (dream, try, fine-tune the policy).")
    steps: int = Field(8, ge=1, description="Policy SFT steps per round on the round's rewarded pairs.")
    batch_size: int = Field(4, ge=1, le=64, description="Rewarded pairs per SFT step (minibatches in a shuffled "
                            "order; all of a round's pairs in one batch would not fit in memory).")
    eval_passages: int = Field(4, ge=0, description="Evaluation passages (the comparison's first ones) whose "
                               "dreams are tried after every round, with the policy frozen, to see whether the "
                               "share of rewarded dreams holds on passages the policy never trained on.")


EXAMPLES_PROMPT = "Examples of requests and their intents, one per line:\n{context}\n"  # the model continues the list


class DreamConfig(Section):
    """Sleep stage 2: dreaming (paper 3.4, SEAL's self-edit loop; docs/design.md §3)."""

    task_source: Literal["stream", "squad"] = Field(
        "stream", description="stream: C = labelled examples of the wake period; squad: C = passages."
    )
    context_examples: int = Field(8, ge=1, description="stream: labelled examples in C.")
    tau_examples: int = Field(16, ge=1, description="stream: held-out wake examples that tau scores.")
    examples_prompt_template: str = Field(EXAMPLES_PROMPT, description="Dream prompt for the stream's C.")
    passages: str = Field("data/raw/squad/squad_val_dev800.json", description="SQuAD-format passages (contexts C).")
    passages_per_sleep: int = Field(1, ge=1, description="Contexts dreamt about in one sleep.")
    dreams_per_context: int = Field(8, ge=1, description="m: dreams sampled per context and round.")
    prompt_template: str = Field(SEAL_IMPLICATIONS, description="Dream prompt; {title} and {context} are filled in.")
    chat: bool = Field(True, description="Wrap the prompt in the model's chat template.")
    max_new_tokens: int = Field(128, ge=1)
    min_new_tokens: int = Field(16, ge=0, description="No EOS before this many dream tokens.")
    temperature: float = Field(1.0, gt=0, le=5.0)
    top_p: float = Field(0.95, gt=0, le=1.0)
    random_expert: bool = Field(True, description="Dream mode: every router also activates one random expert.")
    importance: Literal["norm", "alignment", "random"] = Field(
        "alignment", description="Score of a dream's SFT gradient: its norm or its cosine with the task-loss "
        "gradient; random: no gradient selection (the same number of dreams drawn at random, an ablation).",
    )
    top_k: int = Field(3, ge=0, description="Dreams kept by importance.")
    random_extra: int = Field(1, ge=0, description="b: extra dreams kept at random (diversity).")
    qa_template: str = Field("Question: {question}\nAnswer:", description="tau: questions answered without the passage.")
    train_template: str = Field("{title}\n", description="Prompt a dream is trained after (SFT on the dream text).")
    trial_steps: int = Field(3, ge=1, description="SFT steps of each isolated trial.")
    trial_lr: float = Field(1e-3, gt=0, le=1.0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    trial_workers: int = Field(
        1, ge=1, description="1: a round's trials run in one batched pass in the dream task's process; N > 1: they "
        "are split into up to N groups, each a Prefect task (run_trial_group) on the task runner trial_runner.",
    )
    trial_runner: str = Field(
        "prefect_dask.DaskTaskRunner", pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$",
        description="Qualified class name of the Prefect task runner of the trial groups (trial_workers > 1), "
        "e.g. prefect_dask.DaskTaskRunner or prefect_ray.RayTaskRunner.",
    )
    trial_runner_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of trial_runner. Empty with the Dask runner: a local "
        "cluster of trial_workers single-threaded worker processes, started for the dream stage; "
        "{address: tcp://host:8786} uses a running Dask scheduler instead.",
    )
    rounds: int = Field(1, ge=1, description="R: ReST-EM rounds (generate, try, fine-tune the generator).")
    rest_steps: int = Field(2, ge=0, description="Generator SFT steps per round on (prompt -> rewarded dream).")
    promote_steps: int = Field(4, ge=0, description="SFT steps that train promoted dreams into the fast level.")
    train_into: Literal["fast", "consolidated"] = Field(
        "fast", description="Where ReST-EM and promotion train: the fast level (the next wake trains the same "
        "expert on the next period), or the slower-level experts this sleep consolidated (the period's own, "
        "read-only in wake); the fast level when the sleep consolidated nothing.",
    )
    fold_into_slow: bool = Field(
        False, description="With train_into fast and stream dreams: after the dream training, distil the model "
        "(dream-trained fast level on) into the slow expert this sleep consolidated, in place, on the period's wake "
        "prompts with the consolidation's rehearsal dreams (consolidation's settings), then free the fast level. The "
        "dreams stay with their period's expert and the next wake starts from an empty fast level.",
    )
    fold_dream_weight: float = Field(
        0.0, ge=0, le=100.0, description="With fold_into_slow: the fold also distils the dream-trained model on "
        "the promoted dreams' own text (the train prompt and the dream, every token), with this weight beside the "
        "wake prompts; 0: on the wake prompts only. The dreams are where the fast level learned, so their text "
        "carries what the wake prompts alone may not (method fold_with_dreams).",
    )
    keep_dreams: bool = Field(
        True, description="With train_into fast, stream dreams and no fold (otherwise it does nothing): when the dream "
        "training is kept, the expert it trained stays read-only with this period (its inputs, by prototype routing, "
        "keep what the dreams taught them), where keep_dreams_in says; the next wake writes a new fast expert. "
        "Chosen on development streams by a rule set before the runs (docs/results/issue13/dev-keep-dreams-slow/); "
        "false: the next wake retags and retrains it (method no_keep_dreams).",
    )
    keep_dreams_in: Literal["fast", "slow"] = Field(
        "slow", description="With keep_dreams: where the kept dream expert stays. slow (default): copied into a new "
        "read-only expert of the slow level with its period (exact: same rank, same layers) and the fast level freed, "
        "before the promotion check scores the stage; a full slow level merges its two oldest read-only experts "
        "first, as a consolidation does, so dream experts share the slow level's capacity and are retired by its "
        "merges. fast: read-only in the fast level, kept only while the level keeps a free slot and fewer kept "
        "experts than its top_k, and never freed (method keep_dreams; consolidations free only the writable ones).",
    )
    keep_dreams_when_full: Literal["merge", "absorb"] = Field(
        "absorb", description="With keep_dreams_in slow, when the slow level is full. absorb (default): when the pair "
        "consolidation.merge_pair would merge holds two periods, fit the dream expert into its own period's "
        "consolidated slow expert instead (model/memory/merging.py absorb_into, a same-period merge across levels; the "
        "dream is not kept apart), else merge as below; chosen on development streams by a rule set before the runs "
        "(docs/results/issue13/dev-absorb-dreams/). merge: merge that pair, then move the dream expert into the freed "
        "slot; with no period holding two experts the pair joins two periods and the older period's inputs get the "
        "younger one's function (method merge_for_dreams).",
    )
    promotion_check: bool = Field(
        True, description="Keep the dream stage's training (ReST-EM and promotion) only if it measurably helps: "
        "the period's examples that no dream saw in its context (stream: among every label seen so far; "
        "passages: their questions) score a higher gold log-probability, at no lower accuracy, than in the "
        "consolidated state; otherwise the sleep's state is the consolidated one.",
    )
    check_merged_periods: bool = Field(
        False, description="With promotion_check and keep_dreams_in slow: when the stage's move into a full slow "
        "level merged experts of earlier periods (consolidation.merge_pair), the check also scores those periods' "
        "rehearsal dreams (the consolidation's dreamed inputs, with their labels, among every label seen so far) "
        "before and after the stage, and the stage is kept only if they lost nothing (log-probability and accuracy "
        "not lower). The period's own check set never sees an earlier period's inputs, so without it a merge's cost "
        "to them is unseen (docs/results/issue13/merge-both-starts/). Without rehearsal dreams of those periods the "
        "stage is judged as without it, and the metrics say so.",
    )
    lr: float = Field(1e-3, gt=0, le=1.0, description="Learning rate of ReST-EM and promotion (fast level).")
    max_length: int = Field(512, ge=16)
    gate: DreamGateConfig = Field(default_factory=DreamGateConfig)
    policy: DreamPolicyConfig = Field(default_factory=DreamPolicyConfig)
    enabled: bool = Field(True, description="Dream in every sleep (false: the sleep is consolidation only).")
    state_dir: str = Field("state/sleep", description="Model state after the whole sleep (input of the next wake).")
    dreams_dir: str = "dreams/dreaming"
    reports_dir: str = "reports/dreams"
    metrics_dir: str = "metrics/dreaming"

    @field_validator("prompt_template")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if "{context}" not in v:
            raise ValueError("prompt_template must contain {context}")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> "DreamConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")
        if self.fold_into_slow and self.train_into != "fast":
            raise ValueError("fold_into_slow folds dreams trained into the fast level: it needs train_into 'fast'")
        if self.fold_dream_weight > 0 and not self.fold_into_slow:
            raise ValueError("fold_dream_weight weighs the dreams in a fold: it needs fold_into_slow true")
        return self
