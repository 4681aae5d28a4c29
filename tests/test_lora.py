"""ExPO on LoRA adapters: the output adapter, merged by PEFT over θ₀, is the float64 formula
rounded once; mergekit's `model: sft+adapter` merge agrees within what its own roundings allow;
features that would make the output wrong are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_merge_in_process
from reference import formula64, load

peft = pytest.importorskip("peft")

from mergekit_expo.cli import main  # noqa: E402
from mergekit_expo.lora.adapter import AdapterError, read_adapter  # noqa: E402
from mergekit_expo.lora.extrapolate import expo_adapter  # noqa: E402

ALPHA = 0.7


@pytest.fixture(scope="module")
def base(zoo) -> Path:
    return zoo.base("lora_sft", hidden=64, seed=7)


def make_adapter(base: Path, out: Path, *, seed: int, save_scale: float = 0.002,
                 bf16: bool = False, **config) -> Path:
    """A real PEFT adapter over ``base`` with random (non-zero) A and B and perturbed
    modules_to_save (by ~10 % of their norm, a large fine-tuning step), saved with PEFT's own
    save_pretrained."""
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                "init_lora_weights": False, **config}
    lora = peft.get_peft_model(model, peft.LoraConfig(**settings), autocast_adapter_dtype=not bf16)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * save_scale)
            if "lora_B" in name or "lora_embedding_B" in name:  # a step of a few % of θ₀
                parameter.mul_(0.01)
    lora.save_pretrained(str(out))
    return out


def merged64(base: Path, *adapters: Path) -> dict[str, torch.Tensor]:
    """θ₀ (+ adapters) as PEFT merges them, in float64: base + Σ s·BA, no rounding to speak of."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def differing(actual64: dict, expected64: dict, *inputs: dict, alpha=ALPHA) -> dict[str, int]:
    """Per tensor, elements whose rounding to bf16 is not the exact value's rounding.

    The float64 reference is exact only to ±ε (ε a few float64 ulps of the inputs: near a
    cancellation to 0 that matters), so an element passes if it rounds like some value within
    ±ε of the reference; ε is ~2⁻⁴⁵ of the bf16 rounding step, so any real error still fails.
    """
    counts = {}
    for name, expected in expected64.items():
        eps = 2.0**-48 * (1 + abs(alpha)) * sum(x[name].double().abs() for x in inputs)
        low = (expected - eps).to(torch.bfloat16)
        high = (expected + eps).to(torch.bfloat16)
        actual = actual64[name].to(torch.bfloat16)
        count = int(((actual < low) | (actual > high)).sum())
        if count:
            counts[name] = count
    return counts


# -- one adapter: the scaling ---------------------------------------------------------------


CASES = {
    "lora": {},
    "rslora-patterns": {"use_rslora": True,
                        "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                        "alpha_pattern": {"layers.0.self_attn.v_proj": 3}},
    "modules-to-save": {"modules_to_save": ["lm_head"]},
    "bf16-adapter": {"bf16": True, "target_modules": ["q_proj", "k_proj", "embed_tokens"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_extrapolated_adapter_merges_to_the_float64_formula(case, base, tmp_path):
    adapter = make_adapter(base, tmp_path / "dpo", seed=1, **CASES[case])
    out = expo_adapter([adapter], tmp_path / "out", alpha=ALPHA, base=base)
    theta0, theta1 = merged64(base), merged64(base, adapter)
    expected = {k: formula64(theta0[k], theta1[k], alpha=ALPHA) for k in theta0}
    ours = merged64(base, out)
    assert differing(ours, expected, theta0, theta1) == {}
    changed = [k for k in theta0 if not torch.equal(theta0[k], theta1[k])]
    assert len(changed) >= 4  # the adapter really moves several tensors
    for name in changed:  # and the extrapolation is not the identity or (1+α)²
        step = (ours[name] - theta0[name]).norm() / (theta1[name] - theta0[name]).norm()
        assert float(step) == pytest.approx(1 + ALPHA, rel=1e-3), name
    given, written = read_adapter(adapter), read_adapter(out)
    for pair in given.pairs.values():  # the scaling route leaves every A and B untouched
        assert torch.equal(given.tensors[pair.a_key], written.tensors[pair.a_key])
        assert torch.equal(given.tensors[pair.b_key], written.tensors[pair.b_key])
        assert written.pairs[pair.module].scaling == pytest.approx((1 + ALPHA) * pair.scaling)
    record = json.loads((out / "mergekit_expo.json").read_text())
    assert record["alpha"] == ALPHA and record["route"] == "scaling"
    assert "α = 0.7" in (out / "README.md").read_text()


def test_the_output_loads_in_peft_with_the_scaled_scaling(base, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(base, tmp_path / "dpo", seed=2, **CASES["rslora-patterns"])
    out = expo_adapter([adapter], tmp_path / "out", alpha=ALPHA)
    scalings = {}
    for path in (adapter, out):
        model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), str(path)
        )
        scalings[path] = {n: m.scaling["default"] for n, m in model.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(set(scalings[adapter].values())) >= 3  # the patterns give different scalings
    for name, scaling in scalings[adapter].items():
        assert scalings[out][name] == pytest.approx((1 + ALPHA) * scaling, rel=1e-15)


def test_mergekit_sft_plus_adapter_agrees_within_its_own_roundings(base, tmp_path):
    """mergekit merges the adapter into a bf16 θ₁ (one rounding) before extrapolating, so its
    result may be off by (1+α) half-ulps of θ₁ plus its final half-ulp; the adapter path rounds
    only once. Both bounds are checked element by element."""
    adapter = make_adapter(base, tmp_path / "dpo", seed=3)
    config = {"merge_method": "expo", "base_model": str(base),
              "models": [{"model": f"{base}+{adapter}"}], "parameters": {"alpha": ALPHA}}
    merged = load(run_merge_in_process(config, tmp_path / "mk",
                                       lora_merge_cache=str(tmp_path / "cache")))
    theta0, theta1 = merged64(base), merged64(base, adapter)
    ours = merged64(base, expo_adapter([adapter], tmp_path / "out", alpha=ALPHA))
    flips = 0
    for name, tensor in merged.items():
        exact = formula64(theta0[name], theta1[name], alpha=ALPHA)
        half_ulp = lambda t: torch.finfo(torch.bfloat16).eps * t.abs() / 2  # noqa: E731
        bound = ((1 + ALPHA) * half_ulp(theta1[name]) + half_ulp(exact)) * 1.01 + 1e-30
        assert bool(((tensor.double() - exact).abs() <= bound).all()), name
        flips += int((tensor != exact.to(torch.bfloat16)).sum())
    expected = {k: formula64(theta0[k], theta1[k], alpha=ALPHA) for k in theta0}
    assert differing(ours, expected, theta0, theta1) == {}
    assert flips > 0  # mergekit's extra rounding shows; the adapter path has none


# -- several adapters: rank concatenation ---------------------------------------------------


def test_iterative_adapters_concatenate_to_the_lambda_alpha_merge(base, tmp_path):
    paths = [
        make_adapter(base, tmp_path / "it1", seed=11, r=2, lora_alpha=4),
        make_adapter(base, tmp_path / "it2", seed=12, r=4, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "o_proj"]),
        # the last adapter's config is the template: its layer selection must not leak
        make_adapter(base, tmp_path / "it3", seed=13, modules_to_save=["lm_head"],
                     layers_to_transform=[0]),
    ]
    lam = 0.3
    out = expo_adapter(paths, tmp_path / "out", alpha=ALPHA, lam=lam, base=base)
    theta0 = merged64(base)
    thetas = [merged64(base, p) for p in paths]
    ours = merged64(base, out)
    written = read_adapter(out)
    exacts = {}
    for name, reference in theta0.items():
        exact = formula64(reference, thetas[-1][name], [t[name] for t in thetas[:-1]],
                          alpha=ALPHA, lam=lam)
        module = name.removesuffix(".weight")
        if module in written.pairs:  # B's blocks were rounded once to float32: bound that
            bound = 0.0
            for path in paths:
                adapter = read_adapter(path)
                if module in adapter.pairs:
                    pair = adapter.pairs[module]
                    a, b = (adapter.tensors[k].double().abs() for k in (pair.a_key, pair.b_key))
                    bound = bound + pair.scaling * (b @ a)
            bound = bound * (1 + ALPHA) * 2.0**-23 + 1e-15
            assert bool(((ours[name] - exact).abs() <= bound).all()), name
            assert written.pairs[module].scaling == 1.0
            assert written.pairs[module].rank == sum(
                read_adapter(p).pairs[module].rank for p in paths if module in read_adapter(p).pairs
            )
        exacts[name] = exact
    assert differing(ours, exacts, theta0, *thetas) == {}
    assert "o_proj" in " ".join(written.pairs) and "lm_head.weight" in written.saved


def test_reference_adapter_is_subtracted(base, tmp_path):
    """θ₀ = base + SFT adapter, θ₁ = base + DPO adapter (trained on from the SFT adapter)."""
    sft = make_adapter(base, tmp_path / "sft", seed=21)
    dpo = make_adapter(base, tmp_path / "dpo", seed=22)
    out = expo_adapter([dpo], tmp_path / "out", alpha=ALPHA, reference_adapter=sft)
    theta0, theta1, ours = merged64(base, sft), merged64(base, dpo), merged64(base, out)
    expected = {k: formula64(theta0[k], theta1[k], alpha=ALPHA) for k in theta0}
    assert differing(ours, expected, theta0, theta1) == {}


# -- refusals -------------------------------------------------------------------------------


def test_modules_to_save_needs_the_base_model(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "dpo", seed=4, modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match=r"embedding weights: lm_head.weight\); .*--base"):
        expo_adapter([adapter], tmp_path / "out", alpha=ALPHA)
    assert not (tmp_path / "out").exists()


def test_dora_adapter_merges_to_the_float64_formula(base, tmp_path):
    """DoRA: per-row factors on B and a new magnitude; float32 rounding of B' and m' bounded."""
    dora = make_adapter(base, tmp_path / "dora", seed=5, use_dora=True,
                        target_modules=["q_proj", "down_proj"])
    with pytest.raises(AdapterError, match="DoRA adapter.*--base"):
        expo_adapter([dora], tmp_path / "none", alpha=ALPHA)
    out = expo_adapter([dora], tmp_path / "out", alpha=ALPHA, base=base)
    theta0, theta1, ours = merged64(base), merged64(base, dora), merged64(base, out)
    changed = [k for k in theta0 if not torch.equal(theta0[k], theta1[k])]
    assert len(changed) == 4
    exacts = {}
    given = read_adapter(dora, dora=True)
    for name in theta0:
        exact = formula64(theta0[name], theta1[name], alpha=ALPHA)
        update = 0.0  # |s·B||A|: where rounding B' (float32) can show
        pair = given.pairs.get(name.removesuffix(".weight"))
        if pair is not None:
            a, b = (given.tensors[k].double().abs() for k in (pair.a_key, pair.b_key))
            update = pair.scaling * (b @ a)
        # B' and m' rounded once to float32 (2⁻²⁴ each); the row factor scales whole rows
        bound = 2.0**-22 * (1 + ALPHA) * (exact.abs() + 2 * update) + 1e-15
        assert bool(((ours[name] - exact).abs() <= bound).all()), name
        exacts[name] = exact
    assert differing(ours, exacts, theta0, theta1) == {}
    assert json.loads((out / "mergekit_expo.json").read_text())["route"] == "dora"


def test_dora_and_other_peft_types_are_refused_through_the_cli(base, tmp_path):
    from transformers import AutoModelForCausalLM

    dora = make_adapter(base, tmp_path / "dora", seed=5, use_dora=True)
    other = make_adapter(base, tmp_path / "lora", seed=9)
    ia3 = tmp_path / "ia3"
    peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ).save_pretrained(str(ia3))
    runner = CliRunner()
    result = runner.invoke(main, ["lora", str(dora), str(other), str(tmp_path / "o1"),
                                  "--alpha", "0.5", "--lambda", "0.5"])
    assert result.exit_code == 1 and "use_dora = True is not supported: DoRA" in result.output
    result = runner.invoke(main, ["lora", str(ia3), str(tmp_path / "o2"), "--alpha", "0.5"])
    assert result.exit_code == 1 and "peft_type is 'IA3'" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_full_tensor_in_one_adapter_and_lora_target_in_another_is_refused(base, tmp_path):
    saved = make_adapter(base, tmp_path / "a", seed=6, modules_to_save=["q_proj"],
                         target_modules=["v_proj"])
    lora = make_adapter(base, tmp_path / "b", seed=7)
    with pytest.raises(AdapterError, match="modules_to_save.*LoRA target"):
        expo_adapter([saved, lora], tmp_path / "out", alpha=ALPHA, lam=0.5, base=base)


def test_cli_writes_the_adapter(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "dpo", seed=8)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["lora", str(adapter), str(out), "--alpha", "0.3"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == pytest.approx(8 * 1.3)


# -- the α search on an adapter: scalings only ----------------------------------------------


PROMPTS = ["The assistant answers the question", "A helpful answer is", "Numbers 0 1 2 3"]


def test_adapter_search_samples_what_the_merged_full_model_samples(zoo, tmp_path):
    """Same α, same seed: the adapter candidate (θ₀ + (1+α)·s·BA, unmerged) and the full-model
    candidate (θ₁ merged by mergekit's PEFT step, then extrapolated) sample the same tokens.

    float32, so that the two ways of computing the same model (unmerged LoRA path vs merged
    weights) differ by float32 noise only; in bf16 they can differ in the last bit of a logit
    and sampling can then differ on a near-tie (docs/lora.md)."""
    base = zoo.base("lora_sft32", hidden=64, seed=8, dtype=torch.float32)
    from conftest import write_config

    from mergekit_expo.search.adapter_candidates import AdapterWeights
    from mergekit_expo.search.candidates import CandidateWeights
    from mergekit_expo.search.generation import Sampler, load_tokenizer
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.settings import SamplingSettings

    adapter = make_adapter(base, tmp_path / "dpo", seed=31, modules_to_save=["lm_head"])
    from mergekit.common import ModelReference

    theta1 = ModelReference.parse(f"{base}+{adapter}").merged(cache_dir=str(tmp_path / "cache"))
    adapter_cfg = {"merge_method": "expo", "base_model": str(base),
                   "models": [{"model": f"{base}+{adapter}"}]}
    full_cfg = {**adapter_cfg, "models": [{"model": theta1.model.path}]}
    by_adapter = AdapterWeights(load_search_config(write_config(tmp_path / "a.yml", adapter_cfg)),
                                progress=False)
    search = load_search_config(write_config(tmp_path / "f.yml", full_cfg))
    full = CandidateWeights(search, progress=False)
    tokenizer = load_tokenizer(by_adapter.search)
    sampling = SamplingSettings(max_new_tokens=6, batch_size=3, seed=3)
    assert by_adapter.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A  # unmerged
    seen = []
    for alpha in (0.3, 4.0):
        by_adapter.apply(alpha, 0.0)
        full.apply(alpha, 0.0)
        ours = Sampler(by_adapter.model, tokenizer, PROMPTS, sampling).generate(progress=False)
        theirs = Sampler(full.model, tokenizer, PROMPTS, sampling).generate(progress=False)
        assert ours == theirs
        assert sum(r.tokens for r in ours) > 0
        seen.append(ours)
    by_adapter.apply_reference()
    seen.append(Sampler(by_adapter.model, tokenizer, PROMPTS, sampling).generate(progress=False))
    assert seen[0] != seen[1] != seen[2]  # α reaches the model: the test can tell candidates apart


def test_adapter_search_runs_resumes_and_writes_the_winner(base, tmp_path):
    """The whole search on `BASE+ADAPTER`: DPO scorer, winner as an adapter and as a model."""
    from conftest import write_config

    from mergekit_expo.search.run import run_search
    from mergekit_expo.search.settings import SearchSettings

    adapter = make_adapter(base, tmp_path / "dpo", seed=32)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": p, "chosen": " helpful and honest.", "rejected": " 0 1 2"}) + "\n"
        for p in PROMPTS
    ))
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "expo", "base_model": str(base),
        "models": [{"model": f"{base}+{adapter}"}]})
    settings = SearchSettings.model_validate({
        "config": config, "out_dir": tmp_path / "search", "alphas": [0.2, 0.6],
        "scorer": {"kind": "dpo", "pairs": pairs, "beta": 0.1}, "progress": False,
        "write_best": tmp_path / "merged"})
    report = run_search(settings)
    assert [r["alpha"] for r in report.rows] == [0.2, 0.6]
    assert report.winner is not None and report.adapter == tmp_path / "search" / "best_adapter"
    alpha = report.winner["alpha"]
    written = json.loads((report.adapter / "adapter_config.json").read_text())
    assert written["lora_alpha"] == pytest.approx(8 * (1 + alpha))
    # the merged winner is mergekit's `BASE+ADAPTER` expo merge at the winning α
    merged = load(report.merged)
    expected = load(run_merge_in_process(
        {**yaml_load(config), "parameters": {"alpha": alpha}}, tmp_path / "again",
        lora_merge_cache=str(tmp_path / "cache")))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    again = settings.model_copy(update={"write_best": None})
    assert run_search(again).skipped == 2  # resumed: nothing recomputed


def test_adapter_search_refuses_per_group_alpha(base, tmp_path):
    """One scale per adapter: groups, bands and trials need full checkpoints."""
    from conftest import write_config

    from mergekit_expo.search.merge_config import SearchConfigError
    from mergekit_expo.search.run import run_search
    from mergekit_expo.search.settings import SearchSettings

    adapter = make_adapter(base, tmp_path / "dpo", seed=34)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": " yes", "rejected": " no"}) + "\n")
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "expo", "base_model": str(base),
        "models": [{"model": f"{base}+{adapter}"}]})
    settings = SearchSettings.model_validate({
        "config": config, "out_dir": tmp_path / "search", "alphas": [0.2],
        "scorer": {"kind": "dpo", "pairs": pairs, "beta": 0.1}, "progress": False,
        "groups": ["modules"]})
    with pytest.raises(SearchConfigError, match=r"per-group α .* needs full checkpoints"):
        run_search(settings)
    assert not (tmp_path / "search" / "results.jsonl").exists()


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_search_refuses_adapters_over_different_bases(base, zoo, tmp_path):
    from conftest import write_config

    from mergekit_expo.search.merge_config import SearchConfigError, load_search_config

    adapter = make_adapter(base, tmp_path / "dpo", seed=33)
    config = {"merge_method": "expo", "base_model": str(zoo.sft),
              "models": [{"model": f"{base}+{adapter}"}]}
    with pytest.raises(SearchConfigError, match="adapters over one base model"):
        load_search_config(write_config(tmp_path / "c.yml", config))


def test_adapter_candidates_for_iterative_and_reference_adapters(zoo, tmp_path):
    """θ(α, λ) from scalings alone, with θ₀ = BASE + SFT adapter and three iterates."""
    from conftest import write_config

    from mergekit_expo.search.adapter_candidates import AdapterWeights
    from mergekit_expo.search.merge_config import load_search_config

    base = zoo.base("lora_sft32", hidden=64, seed=8, dtype=torch.float32)
    sft = make_adapter(base, tmp_path / "sft", seed=41)
    its = [make_adapter(base, tmp_path / f"it{i}", seed=42 + i, r=2 + i) for i in range(3)]
    config = {"merge_method": "expo", "base_model": f"{base}+{sft}",
              "models": [{"model": f"{base}+{p}"} for p in its]}
    weights = AdapterWeights(load_search_config(write_config(tmp_path / "c.yml", config)),
                             need_intermediates=True, progress=False)
    theta0 = merged64(base, sft)
    thetas = [merged64(base, p) for p in its]
    for alpha, lam in [(0.5, 0.3), (2.0, 0.0), (-1.0, 0.0)]:
        weights.apply(alpha, lam)
        ours = weights.state_dict()
        for name, reference in theta0.items():
            exact = formula64(reference, thetas[-1][name], [t[name] for t in thetas[:-1]],
                              alpha=alpha, lam=lam)
            torch.testing.assert_close(ours[name].double(), exact, rtol=1e-6, atol=1e-7)
    weights.apply_reference()  # θ₀ itself, for the DPO scorer's reference log-probabilities
    assert weights.applied is None
    torch.testing.assert_close(weights.state_dict()["model.layers.0.self_attn.q_proj.weight"]
                               .double(), theta0["model.layers.0.self_attn.q_proj.weight"],
                               rtol=1e-6, atol=1e-7)


def test_adapter_configs_check_with_the_merge_option_and_print_a_runnable_command(base, tmp_path):
    """``check`` takes `BASE+ADAPTER` configs with the merge's --lora-merge-cache (and says so
    without it); the search prints a merge command that runs as printed."""
    import shlex

    from click.testing import CliRunner
    from conftest import mergekit_yaml_in_process, write_config

    from mergekit_expo.cli import main
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.run import merge_command

    adapter = make_adapter(base, tmp_path / "dpo", seed=33)
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "expo", "base_model": str(base),
        "models": [{"model": f"{base}+{adapter}"}], "parameters": {"alpha": 0.5}})
    refused = CliRunner().invoke(main, ["check", str(config)])
    assert refused.exit_code == 1 and "give --lora-merge-cache DIR" in refused.output
    cache = tmp_path / "cache"
    checked = CliRunner().invoke(main, ["check", str(config), "--lora-merge-cache", str(cache),
                                        "--allow-warnings"])
    assert checked.exit_code == 0, checked.output
    assert f"θ_T = {base}+{adapter}" in checked.output

    command = merge_command(load_search_config(config), config, tmp_path / "search")
    assert "--lora-merge-cache" in command
    out = tmp_path / "merged"
    words = [str(out) if w == "OUT" else w for w in shlex.split(command)]
    assert words[0] == "mergekit-yaml"  # its click command, here in this process
    done = mergekit_yaml_in_process(*words[1:])
    assert done.exit_code == 0, done.output[-2000:]
    assert (out / "config.json").exists()
