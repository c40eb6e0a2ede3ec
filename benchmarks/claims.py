"""The paper's claims, checked against the finished cells of a suite, each with its numbers and a verdict.

Si et al. (arXiv 2409.01035) claim that LoRA-Dash beats LoRA at the same rank (commonsense average, LLaMA-7B r=4:
39.5 -> 75.7; LLaMA3-8B r=16: 82.8 -> 84.4), that LoRA-Init and LoRA-TSD (the two combined) improve on LoRA too,
that dash at a small rank matches LoRA at a larger one, and that task-specific directions (TSDs) are few, sit at
moderate singular values and are visible after a few LoRA steps (Sec. 3-4). Every verdict below follows a fixed
rule from the cell files, never a hand-written conclusion:

- a comparison pairs runs of the same seed (and subject, rank or teacher band); over the n paired differences d
  (signed so that d > 0 favours the claim's side), it **holds** when every d > 0 and mean(d) > 2 std(d) / √n,
  **does not hold** when every d < 0 and -mean(d) > 2 std(d) / √n, and is **within seed noise** otherwise
  (a single pair gets no verdict);
- "few": the top s of the change rates δ carry at least 10 times the share s / k that a flat δ would;
- "moderate σ": the median relative position (0 = largest σ, 1 = smallest) of the TSDs lies in [0.25, 0.75];
- "visible early": overlap@s of the TSDs of LoRA at its first checkpoint with those of the full fine-tune is at
  least 0.5 (**holds**), at least 5 times a random choice's (**in part**), or less (**does not hold**);
- "fewer parameters": dash at the small rank is not worse than lora at a larger one unless lora wins by the rule
  above; when lora at the larger rank does not itself beat lora at the small rank (by the same rule), a "not worse"
  is reported as **not tested here**, since any method that matches the small rank would pass;
- the λ study (dash with λ's learning rate at ``dash_lr_ratio`` times the base rate): each ratio vs lora, pairing
  (subject, seed) over every subject, on the subject probe and the class prompt's leak;
- the teacher study: dash's switch recalls the teacher's directions at least 2 times as often as a random choice.

A verdict says whether an effect is there, not whether it is large: the paired difference is also given in
percent of the other side's mean, to set against the paper's gains (+36.2 and +1.6 accuracy points above).
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

from .report import mean_std
from .subject_study import row_label

TITLE = "The paper's claims, checked"


def paired_verdict(diffs: list[float]) -> str:
    """The rule above for paired differences ``diffs`` (> 0 favours the claim)."""
    if len(diffs) < 2:
        return "one seed, no verdict"
    mean, margin = statistics.mean(diffs), 2 * statistics.stdev(diffs) / len(diffs) ** 0.5
    if all(d > 0 for d in diffs) and mean > margin:
        return "**holds**"
    if all(d < 0 for d in diffs) and -mean > margin:
        return "**does not hold**"
    return "within seed noise"


def not_worse_verdict(diffs: list[float], untested_because: str | None = None) -> str:
    """Non-inferiority (the fewer-parameters claim): it fails only when the other side wins by the rule above; a
    "not worse" that cannot test the claim (``untested_because`` says why) is **not tested here**."""
    verdict = paired_verdict(diffs)
    if verdict in ("one seed, no verdict", "**does not hold**"):
        return verdict
    return (f"**not tested here** ({untested_because})" if untested_because
            else "**holds** (not worse beyond seed noise)")


def _paired(a: dict[Any, float], b: dict[Any, float], higher_is_better: bool = True) -> list[float]:
    sign = 1.0 if higher_is_better else -1.0
    return [sign * (a[k] - b[k]) for k in sorted(a) if k in b]


def _line(what: str, a: str, b: str, va: dict[Any, float], vb: dict[Any, float], higher_is_better: bool = True,
          verdict: Any = paired_verdict) -> str:
    d = _paired(va, vb, higher_is_better)
    size = f" ({100 * statistics.mean(d) / abs(statistics.mean(vb.values())):+.1f} % of {b}'s)" if d else ""
    return (f"| {what} | {a} {mean_std(list(va.values()))} vs {b} {mean_std(list(vb.values()))} "
            f"| {mean_std(d)}{size} | {len(d)} | {verdict(d)} |")


CHALLENGERS = ("dash", "lora_init", "tsd")  # the paper's methods, each claimed to improve on LoRA at the same rank


def same_rank_lines(records: list[dict[str, Any]]) -> list[str]:
    """Each of :data:`CHALLENGERS` vs lora at the same rank: text accuracy (each at its best lr), subject probe,
    teacher error."""
    from .text_quality import at_best_lr

    lines = []
    done = [r for r in records if "result" in r]
    text = [r for r in done if r["config"]["kind"] == "text"]
    for model in sorted({r["config"]["model"] for r in text}):
        _, groups = at_best_lr([r for r in text if r["config"]["model"] == model])
        for rank in sorted({k[1] for k in groups}):
            acc = {m: {x["seed"]: x["after"]["accuracy"] for x in groups.get((m, rank), [])}
                   for m in ("lora", *CHALLENGERS)}
            lines += [_line(f"text, {model} r={rank}: held-out accuracy ↑", m, "lora", acc[m], acc["lora"])
                      for m in CHALLENGERS if acc[m] and acc["lora"]]
    subject = [r for r in done if r["config"]["kind"] == "subject"]
    for name in sorted({r["config"]["subject"] for r in subject}):  # (the λ study's dash cells have rows of their own)
        probe = {m: {r["config"]["seed"]: r["result"]["metrics"][0]["subject_probe"] for r in subject
                     if (r["config"]["subject"], row_label(r["config"])) == (name, m)} for m in ("lora", *CHALLENGERS)}
        lines += [_line(f"subject {name}: sks subject probe ↑", m, "lora", probe[m], probe["lora"])
                  for m in CHALLENGERS if probe[m] and probe["lora"]]
    teacher = [r for r in done if r["config"]["kind"] == "teacher"]
    for band in sorted({r["config"]["teacher_band"] for r in teacher}):
        err = {m: {r["config"]["seed"]: r["result"]["relative_error"] for r in teacher
                   if (r["config"]["teacher_band"], r["config"]["method"]) == (band, m)}
               for m in ("lora", *CHALLENGERS)}
        lines += [_line(f"teacher, {band} band: relative error ↓", m, "lora", err[m], err["lora"],
                        higher_is_better=False)
                  for m in CHALLENGERS if err[m] and err["lora"]]
    return lines


def lambda_study_lines(records: list[dict[str, Any]]) -> list[str]:
    """The λ study (:func:`benchmarks.subject_study.lambda_study_cells`): dash with λ's learning rate at each
    ``dash_lr_ratio`` vs lora, paired by (subject, seed) over every subject: the sks subject probe (↑) and the class
    prompt's probe, the subject leaking into its class (↓)."""
    subject = [r for r in records if "result" in r and r["config"]["kind"] == "subject"]
    lines = []
    for ratio in sorted({r["config"]["dash_lr_ratio"] for r in subject if "dash_lr_ratio" in r["config"]}):
        dash = f"dash λlr×{ratio:g}"
        for what, i, higher in (("sks subject probe ↑", 0, True), ("class prompt: probe (leak) ↓", 1, False)):
            value = {m: {(r["config"]["subject"], r["config"]["seed"]): r["result"]["metrics"][i]["subject_probe"]
                         for r in subject if row_label(r["config"]) == m} for m in ("lora", dash)}
            if value["lora"] and value[dash]:
                lines.append(_line(f"λ study, every subject: {what}", dash, "lora", value[dash], value["lora"],
                                   higher_is_better=higher))
    return lines


def dash_size_lines(records: list[dict[str, Any]]) -> list[str]:
    """Context for the same-rank rows: how large dash's trained term is next to the LoRA update it adds to (the text
    cells that record it, each at its best lr; see :func:`benchmarks.text_quality.dash_scale`). "Strongly": |λ_i| at
    least 0.05 of σ_i; "small next to the LoRA update": ‖λ‖ below 0.1 of ‖γBA‖_F."""
    from .text_quality import at_best_lr

    lines = []
    text = [r for r in records if "result" in r and r["config"]["kind"] == "text"]
    for model in sorted({r["config"]["model"] for r in text}):
        _, groups = at_best_lr([r for r in text if r["config"]["model"] == model])
        for (m, rank), rs in groups.items():
            xs = [x["dash_scale"] for x in rs if "dash_scale" in x]
            if m == "dash" and xs:
                norm = statistics.mean(x["lam_over_lora_norm"] for x in xs)
                sigma = statistics.mean(x["lam_over_sigma"] for x in xs)
                lines.append(f"- Size of dash's term ({model} r={rank}, {len(xs)} seed(s), medians over layers): "
                             f"‖λ‖ is {norm:.3g} of the LoRA update's Frobenius norm and |λ_i| is {sigma:.3g} of σ_i: "
                             + ("it rescales its s directions strongly" if sigma >= 0.05 else
                                "it changes its s directions by a small fraction of their σ")
                             + (", " + ("but" if sigma >= 0.05 else "and")
                                + " the term is small next to the LoRA update."
                                if norm < 0.1 else ", and the term is not small next to the LoRA update."))
    return lines


def fewer_parameters_lines(records: list[dict[str, Any]]) -> list[str]:
    """dash at the smallest rank vs lora at each larger rank (text accuracy), with lora at the small rank against
    the same larger ranks: if lora itself gains nothing from the rank, the task cannot test the claim."""
    from .text_quality import at_best_lr

    lines = []
    text = [r for r in records if "result" in r and r["config"]["kind"] == "text"]
    for model in sorted({r["config"]["model"] for r in text}):
        _, groups = at_best_lr([r for r in text if r["config"]["model"] == model])
        acc = {k: {x["seed"]: x["after"]["accuracy"] for x in v} for k, v in groups.items()}
        params = {k: v[0]["trainable_parameters"] for k, v in groups.items()}
        small = min(rank for m, rank in groups if m == "dash") if any(m == "dash" for m, _ in groups) else None
        for m, rank in groups:
            if m == "lora" and small is not None and rank > small:
                gains = ("lora", small) not in acc or paired_verdict(
                    _paired(acc[("lora", rank)], acc[("lora", small)])) == "**holds**"
                why = None if gains else f"not worse, but lora r={rank} does not beat lora r={small} on this task"
                lines.append(_line(f"text, {model}: dash r={small} ({params[('dash', small)]:,} params) not worse than "
                                   f"lora r={rank} ({params[('lora', rank)]:,} params)", f"dash r={small}",
                                   f"lora r={rank}", acc[("dash", small)], acc[("lora", rank)],
                                   verdict=functools.partial(not_worse_verdict, untested_because=why)))
                if ("lora", small) in acc:
                    lines.append(_line(f"text, {model}: (context) lora r={rank} better than lora r={small}",
                                       f"r={rank}", f"r={small}", acc[("lora", rank)], acc[("lora", small)]))
    return lines


def direction_lines(records: list[dict[str, Any]]) -> list[str]:
    """The TSD properties (the tsd cells, mean over seeds) and the teacher study's recall at the dash switch."""
    lines = []
    done = [r for r in records if "result" in r]
    for model in sorted({r["config"]["model"] for r in done if r["config"]["kind"] == "tsd"}):
        rs = [r["result"] for r in done if r["config"]["kind"] == "tsd" and r["config"]["model"] == model]
        share = statistics.mean(x["full"]["top_s_mass"] for x in rs)
        flat = statistics.mean(x["full"]["flat_top_s_mass"] for x in rs)
        lines.append(f"- TSDs are few ({model}, full fine-tune, {len(rs)} seed(s)): the top s carry {share:.3f} of Σδ, "
                     f"{share / flat:.0f} times a flat δ's {flat:.3f}: "
                     f"{'**holds**' if share >= 10 * flat else '**does not hold**'}.")
        pos = statistics.mean(x["full"]["median_relative_position"] for x in rs)
        top = statistics.mean(x["full"]["share_in_top_decile"] for x in rs)
        bottom = statistics.mean(x["full"]["share_in_bottom_decile"] for x in rs)
        where = ("**holds**" if 0.25 <= pos <= 0.75 else
                 "**does not hold**: they sit at the " + ("smallest" if pos > 0.75 else "largest") + " σ")
        control = [x["full_by_abs_change"] for x in rs if "full_by_abs_change" in x]
        if control:
            cpos = statistics.mean(c["median_relative_position"] for c in control)
            band = {-1: "largest", 0: "moderate", 1: "smallest"}
            side, cside = (band[(p > 0.75) - (p < 0.25)] for p in (pos, cpos))
            why = ("" if side == "moderate" else "; so the update itself acts most along the same σ" if cside == side
                   else "; so the update's own largest changes sit at moderate σ, and the TSDs' place comes from the "
                   "division by σ" if cside == "moderate" else "; so the update itself acts most along the other end "
                   "of the spectrum, and the TSDs' place comes from the division by σ")
            where += (f" (control, {len(control)} seed(s): the top s by |Δσ| alone, without the division by σ, have "
                      f"median position {cpos:.3f}, "
                      f"{statistics.mean(c['share_in_bottom_decile'] for c in control):.3f} "
                      f"in the bottom decile{why})")
        lines.append(f"- TSDs at moderate σ ({model}, full fine-tune): median relative σ position {pos:.3f} "
                     f"(0 = largest σ), {top:.3f} of them in the top σ decile, {bottom:.3f} in the bottom one: "
                     f"{where}.")
        first = [x["by_t"][0] for x in rs]
        t0 = next(r["config"]["checkpoints"][0] for r in done
                  if r["config"]["kind"] == "tsd" and r["config"]["model"] == model)
        overlap, chance = (statistics.mean(b["overlap_full"] for b in first),
                           statistics.mean(x["random_overlap"] for x in rs))
        early = ("**holds**" if overlap >= 0.5 else
                 "**in part**: far above chance, but most of the predicted directions are not the full fine-tune's"
                 if overlap >= 5 * chance else "**does not hold**")
        lines.append(f"- TSDs visible early ({model}): overlap@s of LoRA's TSDs at step {t0} with the full fine-tune's "
                     f"{overlap:.3f}, against the final LoRA update's "
                     f"{statistics.mean(b['overlap_final'] for b in first):.3f}; "
                     f"a random choice {chance:.3f}: {early}.")
    teacher = [r for r in done if r["config"]["kind"] == "teacher" and r["config"]["method"] == "dash"]
    for band in sorted({r["config"]["teacher_band"] for r in teacher}):
        rs = [r for r in teacher if r["config"]["teacher_band"] == band]
        recall = statistics.mean(r["result"]["teacher_recall_at_switch"] for r in rs)
        chance = statistics.mean(r["config"]["directions"] / k for r in rs for k in r["result"]["k"])
        lines.append(f"- Dash's switch finds the task's directions (teacher study, {band} band, {len(rs)} seed(s)): it "
                     f"recalls {recall:.3f} of the teacher's directions, a random choice about {chance:.3f}: "
                     f"{'**holds**' if recall >= 2 * chance else '**does not hold**'}.")
    return lines


def report(records: list[dict[str, Any]]) -> str:
    """The comparison table (same rank, fewer parameters) and the direction properties, from finished cells."""
    rows = same_rank_lines(records) + lambda_study_lines(records) + fewer_parameters_lines(records)
    lines = []
    if rows:
        lines += ["| claim: the method better than lora, or as stated | measured (mean ± std over seeds) "
                  "| paired difference (> 0 favours the claim) | pairs | verdict |", "|---|---|---|---|---|", *rows]
    directions = dash_size_lines(records) + direction_lines(records)
    if directions:
        lines += ["", *directions]
    return "\n".join(lines)
