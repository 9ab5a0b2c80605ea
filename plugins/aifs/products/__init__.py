"""aifs.products: from a date's verified forecasts to the AI Weather Quest files, pictures and submission.

    python -m aifs.products --date 20251127_0000 --bucket B [--members 1-50] [--service-account F]
        [--team T --model M] [--climatology PATH_OR_URL] [--min-members N]
        [--points "Nairobi:-1.29,36.82;..."] [--submit] [--force] [--cost-per-hour 2.5]

Reads only the windows covering days 18-32 and only ``2t``/``msl``/``tp`` (aifs.products.gribread),
member by member, regrids with MIR to 1.5 degrees, makes the periods (aifs.products.periods, the
package's definitions), quintile probabilities against the 20-year climatology, the competition's
NetCDF files (checked by its package), maps, plumes, a run-cost picture and ``report.html`` under
``{date}/products/``; the products manifest is written last. The last stdout line is a JSON summary
(``report``: the page's gs:// address; ``status``: the exit code).

Environment:
  AIFS_AIWQ_PASSWORD   the competition's token (ai-wq-package's ``password``): climatology retrieval
                       without --climatology, and --submit. (AIFS_AIWQ_LOGIN/AIFS_AIWQ_EXTRA, which the
                       DAG also passes, are not used: the package takes the token alone.)
  AIFS_PRODUCTS_COST_PER_HOUR   default of --cost-per-hour.
  MIR_CACHE_PATH       where MIR keeps its interpolation weights.
  STORAGE_EMULATOR_HOST  a GCS emulator (tests, demo).

Exit codes 30-36: aifs.exitcodes. Heavy imports (eccodes, mir, xarray, matplotlib) only inside functions.
"""
