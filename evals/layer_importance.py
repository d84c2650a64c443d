"""How much each layer changes the hidden state, measured once on the base model over calibration text:

- block influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean over tokens of cos(h_l, h_{l+1}),
  where h_l enters layer l; a layer with low BI barely changes its input.
- angular distance (PruneMe; Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers"): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi on each window's last token, averaged over
  windows: how far a block of n layers starting at l moves the representation.

Self-merge use: a layer whose output is close to its input is the cheapest to repeat or to skip, so
``plan_cost`` (the summed block influence of every extra copy and every skipped layer) ranks plans
for the importance prior (``space.prior=importance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from merge_core.layer_plan import LayerPlan


@dataclass(frozen=True)
class LayerImportance:
    block_influence: np.ndarray  # (n_layers,)
    angular_distance: np.ndarray  # (max_block, n_layers): row n-1, column l; NaN where l + n > n_layers
    n_windows: int

    @property
    def n_layers(self) -> int:
        return len(self.block_influence)

    def plan_cost(self, plan: LayerPlan) -> float:
        """Summed block influence of each layer copy beyond the first and of each layer left out."""
        counts = plan.repeat_counts()
        return float(sum(abs(counts.get(layer, 0) - 1) * self.block_influence[layer] for layer in range(self.n_layers)))

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame({"layer": range(self.n_layers), "block_influence": self.block_influence})
        for n in range(1, len(self.angular_distance) + 1):
            frame[f"angular_distance_{n}"] = self.angular_distance[n - 1]
        return frame

    def write(self, directory: Path) -> tuple[Path, Path]:
        """layer_importance.csv and layer_importance.png (heat map of angular distance, block influence)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory.mkdir(parents=True, exist_ok=True)
        csv = directory / "layer_importance.csv"
        self.to_frame().to_csv(csv, index=False)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), height_ratios=[2, 1], sharex=True, layout="constrained")
        image = top.imshow(self.angular_distance, aspect="auto", cmap="viridis", origin="lower",
                           extent=(-0.5, self.n_layers - 0.5, 0.5, len(self.angular_distance) + 0.5))  # fmt: skip
        fig.colorbar(image, ax=[top, bottom], label="angular distance / pi", shrink=0.6, anchor=(0, 1))  # both axes keep one width
        top.set_ylabel("block size n (layers)")
        windows = f" ({self.n_windows} windows)" if self.n_windows else ""
        top.set_title(f"Angular distance between the input of layer l and of layer l+n{windows}")
        bottom.bar(range(self.n_layers), self.block_influence, color="tab:orange")
        bottom.set_ylabel("block influence")
        bottom.set_xlabel("layer l")
        png = directory / "layer_importance.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return csv, png

    @classmethod
    def read(cls, csv: Path) -> LayerImportance:
        import pandas as pd

        frame = pd.read_csv(csv)
        blocks = sorted(int(c.rsplit("_", 1)[1]) for c in frame.columns if c.startswith("angular_distance_"))
        distance = np.array([frame[f"angular_distance_{n}"].to_numpy() for n in blocks])
        return cls(frame["block_influence"].to_numpy(), distance, n_windows=0)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return torch.arccos(cos) / torch.pi


@torch.inference_mode()
def measure(model, windows: list[list[int]], max_block: int = 8) -> LayerImportance:
    """Hidden states entering each layer (and leaving the last, before the final norm), per window."""
    from evals.torch_model import run_layer

    inner = model.model
    n_layers = len(inner.layers)
    max_block = min(max_block, n_layers)
    influence = np.zeros(n_layers)
    distance = np.zeros((max_block, n_layers))
    device = next(model.parameters()).device
    for window in windows:
        ids = torch.tensor([window], device=device)
        hidden = inner.embed_tokens(ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids=torch.arange(len(window), device=device).unsqueeze(0))
        states = [hidden[0]]
        for layer in inner.layers:
            hidden = run_layer(layer, hidden, position_embeddings)
            states.append(hidden[0])
        for l in range(n_layers):
            influence[l] += (1 - torch.nn.functional.cosine_similarity(states[l].double(), states[l + 1].double(), dim=-1)).mean().item()
            for n in range(1, max_block + 1):
                if l + n <= n_layers:
                    distance[n - 1, l] += _angle(states[l][-1], states[l + n][-1]).item()
    distance /= len(windows)
    for n in range(1, max_block + 1):
        distance[n - 1, n_layers - n + 1 :] = np.nan
    return LayerImportance(influence / len(windows), distance, len(windows))
