"""Reward-model scores and reference log-probs equal direct transformers calls."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlfleet.common.reward_scale import ScoreNormalizer
from rlfleet.common.tiny_models import build_tiny_reward_model
from rlfleet.learner.algos import logprobs_from_logits
from rlfleet.services.reference import ReferenceService
from rlfleet.services.reward_model import RewardModelScorer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"), seed=3)


def mixed_sequences(seed: int, count: int = 11) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (count,), generator=g).tolist()
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_scores_equal_direct_calls(rm_dir, side):
    scorer = RewardModelScorer(str(rm_dir), micro_batch_size=4, padding_side=side)
    direct = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    seqs = mixed_sequences(0)
    scores = scorer.score(seqs)
    with torch.no_grad():
        expected = [direct(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(scorer.batch_sizes) <= 4 and sum(scorer.batch_sizes) == len(seqs)


def test_reward_read_at_true_last_token_even_if_it_is_the_pad_id(rm_dir):
    scorer = RewardModelScorer(str(rm_dir))
    direct = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    seq = [10, 11, 12, 0]  # a response that ends in a sampled pad token (id 0)
    with torch.no_grad():
        hidden = direct.base_model(torch.tensor([seq])).last_hidden_state
        expected = direct.score(hidden[0, -1]).item()
    assert scorer.score([seq, [5, 6]])[0] == pytest.approx(expected, abs=1e-5)


def test_reward_model_with_two_labels_is_refused(tmp_path, rm_dir):
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=2, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"reward.model_path=.*head has 2 labels; a reward model needs exactly 1"):
        RewardModelScorer(str(tmp_path))
    with pytest.raises(ValueError, match=r"reward.model_path='/no/such/model': cannot load"):
        RewardModelScorer("/no/such/model")


def test_normalizer_running_fixed_and_clip():
    norm = ScoreNormalizer("running")
    seen: list[float] = []
    for batch in ([1.0, 2.0, 3.0], [10.0], [-4.0, 0.5, 7.0, 2.0]):
        seen += batch
        out = norm(batch)
        mean, std = statistics.mean(seen), statistics.stdev(seen)
        assert norm.mean == pytest.approx(mean) and norm.std == pytest.approx(std)
        assert out == pytest.approx([(b - mean) / std for b in batch])
    fixed = ScoreNormalizer("fixed", mean=1.0, std=2.0, clip=1.0)
    assert fixed([3.0, 1.0, 100.0, -100.0, math.nan])[:4] == [1.0, 0.0, 1.0, -1.0]
    restored = ScoreNormalizer("running")
    restored.load_state_dict(norm.state_dict())
    assert restored([5.0]) == norm([5.0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_logprobs_equal_direct_forward(tiny_model_dir, temperature):
    ref = ReferenceService(str(tiny_model_dir), micro_batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seqs = mixed_sequences(1, count=7)
    prompts = [s[: max(1, len(s) // 3)] for s in seqs]
    responses = [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]
    got = ref.logprobs(prompts, responses, temperature=temperature)
    for p, r, lp in zip(prompts, responses, got, strict=True):
        assert len(lp) == len(r)  # response tokens only
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / temperature
        expected = logprobs_from_logits(logits[None], torch.tensor([r]))[0]
        torch.testing.assert_close(torch.tensor(lp), expected, rtol=0, atol=1e-5)
    # Logits were computed for the response columns only (+1), never for whole sequences.
    assert all(w <= max(len(r) for r in responses) for w in ref.forward_widths)


def test_service_info(tiny_model_dir, rm_dir):
    ref = ReferenceService(str(tiny_model_dir))
    info = ref.info()
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert (info.parameters, info.device, info.dtype) == (params, "cpu", "float32")
    assert RewardModelScorer(str(rm_dir)).info().parameters < params  # a 1-label head, no LM head


def test_the_reward_service_is_stateless_and_the_learners_scaler_normalises_its_model_score(rm_dir):
    """The service returns the reward model's raw score (weighted in `scores`); the same call
    gives the same scores on a fresh service (what a restart gives). The learner's scaler folds
    each trained batch into the running statistics and normalises the model's component;
    evaluation moves nothing; its state round-trips (the learner's checkpoint)."""
    from rlfleet.common.config import RewardConfig
    from rlfleet.common.reward_scale import RewardScaler
    from rlfleet.services.reward_service import RewardService

    config = RewardConfig(model_path=str(rm_dir), normalize="running", model_weight=2.0)
    seqs = mixed_sequences(5)
    prompts, responses = [s[:3] for s in seqs], [s[3:] for s in seqs]
    service = RewardService(config, str(rm_dir))
    first = service.score(prompts[:6], responses[:6])
    raw = first.components["model"]
    assert first.weights == {"model": 2.0} and first.scores == pytest.approx([2 * r for r in raw], abs=1e-6)
    assert service.score(prompts[:6], responses[:6]).scores == pytest.approx(first.scores, abs=1e-6)
    assert RewardService(config, str(rm_dir)).score(prompts[:6], responses[:6]).scores == pytest.approx(
        first.scores, abs=1e-6)
    scaler = RewardScaler.of(config)
    mean, std = statistics.mean(raw), statistics.stdev(raw)
    trained = scaler(first.scores, first.components, first.weights)
    assert trained == pytest.approx([2 * (r - mean) / std for r in raw], abs=1e-5)
    state = scaler.state_dict()
    assert state["count"] == 6
    second = service.score(prompts[6:], responses[6:])
    evaluated = scaler(second.scores, second.components, second.weights, update=False)
    assert scaler.state_dict() == state  # evaluation does not move the statistics
    assert evaluated == pytest.approx([2 * (r - mean) / std for r in second.components["model"]], abs=1e-5)
    restored = RewardScaler.of(config)
    restored.load_state_dict(state)
    assert restored(second.scores, second.components, second.weights) == pytest.approx(
        scaler(second.scores, second.components, second.weights), abs=1e-9)
    # without normalisation the service's sums are what the learner trains on
    plain = RewardScaler.of(RewardConfig(model_path=str(rm_dir)))
    assert plain(first.scores, first.components, first.weights) == first.scores


def test_the_reward_services_decoder_equals_the_tokenizers_batch_decode(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The rule path decodes with `tokenizers` directly (no transformers import): the same text
    as `batch_decode(skip_special_tokens=True)`, special tokens inside and around included. A
    folder whose config asks for the clean-up of tokenization spaces goes through transformers."""
    from rlfleet.services.decoding import TextDecoder

    decoder = TextDecoder(str(tiny_model_dir))
    assert decoder.direct
    ids = [tiny_tokenizer("12+7= 19, a b.\n").input_ids, [1, 5, 2, 40, 0, 0, 3, 77], [], [2]]
    assert decoder.batch_decode(ids) == tiny_tokenizer.batch_decode(ids, skip_special_tokens=True)
    cleaned = tmp_path / "cleaned"
    tiny_tokenizer.save_pretrained(cleaned)
    config = cleaned / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"clean_up_tokenization_spaces": true,', 1))
    assert not TextDecoder(str(cleaned)).direct


def test_bf16_compute_of_the_reference_and_the_reward_model_stays_near_fp32(tiny_model_dir, rm_dir):
    """model.dtype bfloat16: the services' matrix products under bf16 autocast (fp32 weights),
    log-probs and scores from fp32 — close to fp32's, and not fp32's (bf16 really ran)."""
    seqs = mixed_sequences(4, count=6)
    prompts, responses = [s[:3] for s in seqs], [s[3:] for s in seqs]
    fp32 = ReferenceService(str(tiny_model_dir), micro_batch_size=4).logprobs(prompts, responses)
    bf16 = ReferenceService(str(tiny_model_dir), micro_batch_size=4, compute_dtype="bfloat16").logprobs(prompts, responses)
    a, b = torch.tensor(sum(fp32, [])), torch.tensor(sum(bf16, []))
    assert (a - b).abs().max() < 0.05 and not torch.equal(a, b)
    scores32 = RewardModelScorer(str(rm_dir), micro_batch_size=4).score(seqs)
    scores16 = RewardModelScorer(str(rm_dir), micro_batch_size=4, compute_dtype="bfloat16").score(seqs)
    assert scores16 == pytest.approx(scores32, abs=0.05) and scores16 != scores32
