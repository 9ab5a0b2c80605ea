"""aifs.inputs: every member's input state built from ECMWF open data (``python -m aifs.inputs``).

Importing the package is light (standard library only): the Airflow side polls
:func:`opendata_published` from a trigger. The heavy stack (eccodes, MIR, anemoi) is imported by
the modules that build states, which only run in the worker image.
"""

from aifs.inputs.published import opendata_published

__all__ = ["opendata_published"]
