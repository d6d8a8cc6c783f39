"""Prints the numbers that node/src/dp.rs's `matches_the_opendp_python_package` test records.

Run with the opendp Python package of the same version as the Rust crate:
    python3 -m venv /tmp/odp && /tmp/odp/bin/pip install opendp==0.16.0
    /tmp/odp/bin/python scripts/opendp_crosscheck.py
"""

import opendp.prelude as dp

dp.enable_features("contrib")

for rho in [0.05, 0.5, 0.01]:
    scale = 1 / (2 * rho) ** 0.5
    m = dp.m.make_gaussian(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale)
    approx = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(m), 1e-6)
    print(f"rho {rho}: scale {scale!r}, map(1) {m.map(1)!r}, (eps, delta) {approx.map(1)!r}")

lap = dp.m.make_laplace(dp.atom_domain(T=int), dp.absolute_distance(T=int), 2.0)
print(f"discrete laplace scale 2.0: map(1) {lap.map(1)!r}")
