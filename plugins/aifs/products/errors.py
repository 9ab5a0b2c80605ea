"""Errors of the products step, each carrying the exit code (aifs.exitcodes) the command ends with."""

from __future__ import annotations

from aifs.exitcodes import ExitCode


class ProductsError(Exception):
    code: ExitCode = ExitCode.FORECASTS_MISSING

    def __init__(self, message: str):
        super().__init__(message)


class ForecastsMissing(ProductsError):
    code = ExitCode.FORECASTS_MISSING


class ForecastInvalid(ProductsError):
    code = ExitCode.FORECAST_INVALID


class TooFewMembers(ProductsError):
    code = ExitCode.TOO_FEW_MEMBERS


class ClimatologyFailed(ProductsError):
    code = ExitCode.CLIMATOLOGY_FAILED


class CheckFailed(ProductsError):
    code = ExitCode.CHECK_FAILED


class SubmissionFailed(ProductsError):
    code = ExitCode.SUBMISSION_FAILED


class ProductsUploadFailed(ProductsError):
    code = ExitCode.PRODUCTS_UPLOAD_FAILED
