"""The sparsekernels benchmark harness: ``python -m bench`` (``make bench`` runs the quick suite).

It answers "is sparse faster for my shape, and by how much" in one command, and it is how the
project backs every speed claim. Each cell of a grid (weight shape, layout, dtype, M, op) is run by
sparsekernels and by its peers in the same process (dense ``F.linear`` as the 1.00x baseline, torch
BSR, torch 2:4 semi-structured, stk), each result is checked against a dense float32 reference, and
the timings go to a terminal table, ``results.json``, ``results.csv`` and PNG plots. The e2e suite
measures whole GPT models with sparsified MLPs instead. docs/benchmark.md is the user's guide.

Modules, in the order data flows through them:

* ``suites``: the named grids (quick, full, targets) and their timing settings.
* ``targets``: the cells and target ratios of issues 4 and 5, and the verdict table of a targets run.
* ``cases``: one cell of a grid, and parsing of the command line's shape / layout / dtype lists.
* ``workloads``: the tensors of a cell (pruned weight, inputs).
* ``implementations``: sparsekernels (one column per backend) and the peers behind one interface.
* ``correctness``: the float32 reference and the tolerance check.
* ``timing``: wall clock on CPU, CUDA graphs plus eager time on CUDA.
* ``metrics``: useful FLOPs and bytes of a cell.
* ``roofline``: the GPU peak table and the percentage of roofline.
* ``runner``: measures every implementation on every cell.
* ``results``: the records the runner produces, and their JSON form.
* ``errors``: the short form of an exception stored in a cell.
* ``report`` / ``environment``: the table, the files, and the machine description.
* ``plots``: speedup-against-density and roofline PNGs (also ``python -m bench plot``).
* ``e2e`` / ``gpt``: the e2e suite and the small GPT it sparsifies.
* ``test_benchmarks``: pytest-benchmark variants of the quick cells (``pytest bench --benchmark-only``).
* ``compare``: ``python -m bench compare OLD.json NEW.json``, the regression check.
* ``resume``: ``--resume``, continuing a cut-off run from its ``results.json``.
* ``cli``: the command line.
"""
