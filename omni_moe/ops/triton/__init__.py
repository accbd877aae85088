"""Import paths of the public flash-algo/omni-moe package (``omni_moe.ops.triton.*``),
kept so that code written for it runs unchanged: thin adapters over ``omni_moe``'s public
functions with upstream's names and signatures (docs/compatibility.md)."""
