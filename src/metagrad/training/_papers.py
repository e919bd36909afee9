"""What each algorithm's own paper reports, for the settings ``metagrad train`` runs.

Values are accuracies as fractions (Omniglot, test after the paper's step count) or query MSE
(sinusoid, K=5 test shots). ``ci95`` is the paper's ± where it gives one. Only numbers read in
the paper's own tables (or, for FOMAML, the Reptile and iMAML papers' tables that quote it) are
listed; the papers trained on the full Omniglot background set (1,200 characters, Vinyals et
al.'s split), not on the 193 training characters of the two "background small" zips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PaperNumber:
    """One published result: ``value`` (± ``ci95``) from ``source``."""

    value: float
    ci95: float | None
    source: str

    def text(self, accuracy: bool, pm: str = "±") -> str:
        """``'99.16% ± 0.35% (source)'`` (accuracy) or ``'0.670 (source)'`` (MSE)."""
        value = f"{100 * self.value:.2f}%" if accuracy else f"{self.value:.3f}"
        if self.ci95 is not None:
            ci = f"{100 * self.ci95:.2f}%" if accuracy else f"{self.ci95:.3f}"
            value = f"{value} {pm} {ci}"
        return f"{value} ({self.source})"


PAPER_NUMBERS: Mapping[tuple[str, str], PaperNumber] = {
    ("maml", "omniglot-5w1s"): PaperNumber(0.987, 0.004, "Finn et al. 2017, Table 1"),
    ("maml", "omniglot-5w5s"): PaperNumber(0.999, 0.001, "Finn et al. 2017, Table 1"),
    ("maml", "omniglot-20w1s"): PaperNumber(0.958, 0.003, "Finn et al. 2017, Table 1"),
    ("maml", "omniglot-20w5s"): PaperNumber(0.989, 0.002, "Finn et al. 2017, Table 1"),
    ("maml", "sinusoid-5shot"): PaperNumber(0.67, None, "Finn et al. 2017, Table 2, 1 step"),
    ("fomaml", "omniglot-5w1s"): PaperNumber(0.983, 0.005, "Nichol et al. 2018"),
    ("fomaml", "omniglot-20w1s"): PaperNumber(0.894, 0.005, "Nichol et al. 2018"),
    # Transductive (batch statistics over the query set, as metagrad's default BN policy).
    ("reptile", "omniglot-5w1s"): PaperNumber(0.9768, 0.0004, "Nichol et al. 2018, transductive"),
    ("reptile", "omniglot-20w1s"): PaperNumber(0.8943, 0.0014, "Nichol et al. 2018, transductive"),
    ("metasgd", "omniglot-5w1s"): PaperNumber(0.9953, 0.0026, "Li et al. 2017"),
    ("anil", "omniglot-20w1s"): PaperNumber(0.962, 0.005, "Raghu et al. 2020"),
    ("mamlpp", "omniglot-5w1s"): PaperNumber(0.9947, None, "Antoniou et al. 2019"),
    ("mamlpp", "omniglot-20w1s"): PaperNumber(0.9765, None, "Antoniou et al. 2019"),
    # iMAML with gradient-descent inner loop (iMAML-GD), as metagrad.IMAML runs it.
    ("imaml", "omniglot-5w1s"): PaperNumber(0.9916, 0.0035, "Rajeswaran et al. 2019, iMAML-GD"),
    ("imaml", "omniglot-20w1s"): PaperNumber(0.9446, 0.0042, "Rajeswaran et al. 2019, iMAML-GD"),
}


def setting_name(config: Mapping[str, Any], test_shots: int) -> str | None:
    """The :data:`PAPER_NUMBERS` setting key of a run's config, or None.

    ``omniglot-<n>w<k>s`` from the test-time ways and shots, ``sinusoid-5shot`` for sinusoid
    runs tested with K=5; any other task or shape has no published counterpart here.
    """
    task = config.get("task")
    if task == "omniglot":
        return f"omniglot-{config.get('n_way')}w{test_shots}s"
    if task == "sinusoid" and test_shots == 5:
        return "sinusoid-5shot"
    return None


def paper_number(algorithm: str, setting: str | None) -> PaperNumber | None:
    """The number ``algorithm``'s paper reports for ``setting``, or None if it reports none."""
    return None if setting is None else PAPER_NUMBERS.get((algorithm, setting))
