"""N-way K-shot classification tasks over any :class:`ImageClasses` (index gathering only)."""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.tasks._batch import TaskBatch, check_positive, make_generator
from metagrad.tasks._images import DatasetError, ImageClasses


class FewShotTasks:
    """Sampler of N-way K-shot tasks with Q queries per class, deterministic given ``seed``.

    Each task draws ``n_way`` distinct classes in random order (so labels ``0..N-1`` are a fresh
    random permutation of the chosen classes) and ``shots + queries`` distinct images per class.

    Args:
        classes: the decoded images (e.g. one split of :func:`load_omniglot`).
        n_way: classes per task ``N``.
        shots: support images per class ``K``.
        queries: query images per class ``Q``.
        seed: seed of the sampler's own ``torch.Generator``.
        dtype: floating dtype of the images (uint8 values scaled to ``[0, 1]``).

    Returns (from :meth:`sample`):
        ``xs [T, N*K, C, H, W]``, ``ys [T, N*K]`` (long), ``xq [T, N*Q, C, H, W]``, ``yq [T, N*Q]``;
        support and query are ordered class by class.

    Raises:
        DatasetError: fewer than ``n_way`` classes, or a class with fewer than ``K + Q`` images.

    Example:
        >>> import torch
        >>> data = ImageClasses(torch.zeros(12, 1, 4, 4, dtype=torch.uint8),
        ...                     torch.arange(3).repeat_interleave(4), ["a", "b", "c"])
        >>> xs, ys, xq, yq = FewShotTasks(data, n_way=2, shots=1, queries=3, seed=0).sample(5)
        >>> tuple(xs.shape), tuple(yq.shape)
        ((5, 2, 1, 4, 4), (5, 6))
    """

    def __init__(
        self,
        classes: ImageClasses,
        n_way: int,
        shots: int,
        queries: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        fn = "metagrad.tasks.FewShotTasks"
        check_positive(fn, n_way=n_way, shots=shots, queries=queries)
        if n_way > classes.num_classes:
            raise DatasetError(
                f"{fn}: n_way={n_way} but the data has only {classes.num_classes} classes. Fix: "
                f"lower --n-way to at most {classes.num_classes} or use more classes."
            )
        sizes = classes.class_sizes()
        need = shots + queries
        small = [i for i in range(classes.num_classes) if int(sizes[i]) < need]
        if small:
            shown = ", ".join(f"{classes.names[i]!r} ({int(sizes[i])})" for i in small[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise DatasetError(
                f"{fn}: shots + queries = {shots} + {queries} = {need} images per class are needed "
                f"but class {shown}{more} has fewer. Fix: lower --k-shot/--queries or remove "
                f"those classes."
            )
        self.classes = classes
        self.n_way, self.shots, self.queries = n_way, shots, queries
        self.dtype = dtype
        self.generator = make_generator(seed)
        # Padded table [num_classes, max_size] of image indices, class by class.
        order = torch.argsort(classes.targets, stable=True)
        self._sizes = sizes
        self._table = torch.zeros(classes.num_classes, int(sizes.max()), dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        for c in range(classes.num_classes):
            s, n = int(starts[c]), int(sizes[c])
            self._table[c, :n] = order[s : s + n]

    def sample_indices(self, tasks: int) -> tuple[Tensor, Tensor]:
        """Image indices ``[T, N, K + Q]`` and the chosen classes ``[T, N]`` (label = position)."""
        check_positive("metagrad.tasks.FewShotTasks.sample", tasks=tasks)
        T, N, C = tasks, self.n_way, self.classes.num_classes
        g = self.generator
        chosen = torch.rand(T, C, generator=g).argsort(dim=1)[:, :N]
        width = self._table.shape[1]
        keys = torch.rand(T, N, width, generator=g)
        keys = keys.masked_fill(torch.arange(width) >= self._sizes[chosen].unsqueeze(-1), 2.0)
        pick = keys.argsort(dim=-1)[..., : self.shots + self.queries]
        return self._table[chosen.unsqueeze(-1), pick], chosen

    def sample(self, tasks: int) -> TaskBatch:
        """``tasks`` new tasks (see the class docstring for shapes)."""
        idx, _ = self.sample_indices(tasks)
        T, N, K, Q = tasks, self.n_way, self.shots, self.queries
        images = self.classes.images
        scale = 1.0 / 255.0

        def gather(ix: Tensor) -> Tensor:
            flat = images.index_select(0, ix.reshape(-1)).to(self.dtype) * scale
            return flat.view(T, -1, *images.shape[1:])

        labels = torch.arange(N)
        ys = labels.repeat_interleave(K).expand(T, N * K).contiguous()
        yq = labels.repeat_interleave(Q).expand(T, N * Q).contiguous()
        return TaskBatch(gather(idx[..., :K]), ys, gather(idx[..., K:]), yq)

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state (safe for ``torch.load(weights_only=True)``)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
