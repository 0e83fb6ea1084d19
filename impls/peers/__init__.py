"""The peers, Opacus and BackPACK, behind the pegbench interface.

``run.LibraryRun`` is the structure both adapters share (attach the library, watch the forward
with our own hooks beside the library's, backpropagate the summed losses once, read the
library's per-parameter results, detach whatever happened); ``support`` holds the watch and the
refusal helpers; ``opacus`` (with ``opacus_plan`` and ``opacus_watch``) and ``backpack`` hold
what is particular to each library.
"""
