"""Offline preference pairs (`diffalign train`): x0 stacked [w; l], keyed t and eps, x_t by the objective's xt_source."""

from __future__ import annotations

from diffalign.engine.step import StepContext, family_inputs, keyed_t_and_eps
from diffalign.inversion import XT_SOURCES
from diffalign.likelihood import denoising_errors
from diffalign.sources.base import ErrorInputs, Source, batch_baseline

# x_t sources that draw noise of their own get it from the rows' keyed generators (InPO's eta noise)
XT_KWARGS = {"ddim_inversion": lambda gens: {"generator": gens}}


class Pairs(Source):
    name = "pairs"
    program = "train"

    def check(self, cfg) -> None:
        """Nothing beyond the schema: the train program checks soft labels against data.label_mode."""

    def inputs(self, ctx: StepContext, batch: dict, device) -> ErrorInputs:
        """Collated preference pairs (diffalign.data), each drawn with the generator keyed on (seed, epoch, pair)."""
        x0, cond, label = family_inputs(ctx.family, batch, device)
        keys = list(zip(batch["epoch"], batch["index"].tolist()))
        t, eps, gens = keyed_t_and_eps(ctx.objective.paired, x0, ctx.schedule, ctx.seed, keys, ctx.estimator)
        xt_kwargs = XT_KWARGS.get(ctx.objective.xt_source, lambda g: {})(gens)
        xt_source = XT_SOURCES[ctx.objective.xt_source]
        errors = denoising_errors(ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, xt_source, xt_kwargs)
        return ErrorInputs(errors.err, errors.ref_err, label, z=batch_baseline(ctx, errors.err, errors.ref_err))
