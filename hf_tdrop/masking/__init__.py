"""Targeted-dropout and magnitude-pruning masks as pure tensor functions.

Every function here works on a weight matrix viewed as ``[n_out, fan_in]``: row ``o`` is w_o, all
the weights feeding output unit (or channel) ``o``. :func:`unit_matrix` makes that view for the
supported layouts. Nothing here touches modules, and nothing draws random numbers except
:func:`sample_drop` / :func:`random_words` (and the random-pruning masks), which use torch's global
RNG (reproducible under ``torch.manual_seed``) unless a ``generator`` is given.

Selection ranks in float32 whatever the weight's dtype, so exactly ``k`` elements are selected even
when low-precision weights tie (ties go to the lowest index). :func:`lowest_k` is a partial
selection per row (``topk`` of the smaller side, plus a cumulative count only when ties need
breaking), never a full sort; :func:`lowest_k_bracketed` gives the same mask for weights that move
a little between calls (training), mostly by counting against the previous call's thresholds.
Both read a few values back to the host per call (cheap on CPU, a stall on an accelerator): on the
device types in :data:`SYNC_FREE_DEVICE_TYPES` they give way to :func:`lowest_k_sync_free`, the
same mask from one ``topk`` over unique sort keys, with no host synchronisation. On CPU,
:func:`targeted_weights_bracketed` runs the compiled kernel of :mod:`hf_tdrop.native` when it is
available: the same masks and brackets in two passes over each row.
:func:`targeted_nm` ranks within groups of ``m`` consecutive entries of each row (N:M patterns), by
``m`` whole-tensor comparisons instead of a sort.

The functions live in four modules by concern, all re-exported here: :mod:`.layouts` (the
``[n_out, fan_in]`` view and exact counts), :mod:`.selection` (exact and bracketed selection, the
sync-free path, magnitude masks), :mod:`.groups` (N:M patterns) and :mod:`.sampling` (the
Bernoulli draws). The set of device types that select without host synchronisation is
``hf_tdrop.masking.selection.SYNC_FREE_DEVICE_TYPES`` (read here as ``SYNC_FREE_DEVICE_TYPES``).
"""

from __future__ import annotations

from .layouts import (  # noqa: F401
    LAYOUTS,
    LAYOUT_IN_OUT,
    LAYOUT_OUT_IN,
    fraction_count,
    nm_group_count,
    nm_group_nonzeros,
    nm_targetable_groups,
    to_weight_layout,
    unit_matrix,
)
from .selection import (  # noqa: F401
    KthBracket,
    SYNC_FREE_DEVICE_TYPES,
    kth_smallest,
    lowest_k,
    lowest_k_bracketed,
    lowest_k_per_row,
    lowest_k_sync_free,
    random_unit_prune_mask,
    random_weight_prune_mask,
    targeted_units,
    targeted_units_among,
    targeted_weights,
    targeted_weights_among,
    targeted_weights_among_bracketed,
    targeted_weights_bracketed,
    unit_norms,
    unit_prune_mask,
    uses_sync_free_selection,
    weight_prune_mask,
)
from .groups import (  # noqa: F401
    nm_prune_mask,
    random_nm_prune_mask,
    targeted_nm,
)
from .sampling import (  # noqa: F401
    WORD_LEVELS,
    drop_word_threshold,
    random_words,
    sample_drop,
)

__all__ = [
    "KthBracket",
    "LAYOUTS",
    "LAYOUT_IN_OUT",
    "LAYOUT_OUT_IN",
    "SYNC_FREE_DEVICE_TYPES",
    "WORD_LEVELS",
    "drop_word_threshold",
    "fraction_count",
    "kth_smallest",
    "lowest_k",
    "lowest_k_bracketed",
    "lowest_k_per_row",
    "lowest_k_sync_free",
    "nm_group_count",
    "nm_group_nonzeros",
    "nm_prune_mask",
    "nm_targetable_groups",
    "random_nm_prune_mask",
    "random_unit_prune_mask",
    "random_weight_prune_mask",
    "random_words",
    "sample_drop",
    "targeted_nm",
    "targeted_units",
    "targeted_units_among",
    "targeted_weights",
    "targeted_weights_among",
    "targeted_weights_among_bracketed",
    "targeted_weights_bracketed",
    "to_weight_layout",
    "unit_matrix",
    "unit_norms",
    "unit_prune_mask",
    "uses_sync_free_selection",
    "weight_prune_mask",
]
