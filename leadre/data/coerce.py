"""Raw column values -> the schema's types, tolerating the encodings real logs use (integer
ids, epoch seconds, ISO strings, "yes"/"1" booleans).

Each coercion returns (typed values, mask of rows whose value had the wrong type). A null/NaN
input is not a type error; the required-field checks of :mod:`leadre.data.schema` handle it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

# Event time in every table: epoch milliseconds, UTC.
TS_TYPE = pa.timestamp("ms", tz="UTC")


def _is_null(s: pd.Series) -> np.ndarray:
    return s.isna().to_numpy()


def _coerce_str(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Strings pass, integers become their decimal string (numeric ids are common), others fail."""
    def conv(v):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return None
        if isinstance(v, str):
            return v
        if isinstance(v, (bool, np.bool_)):
            return _BAD
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return _BAD

    if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        out = s.astype(object).where(~s.isna(), None)
        return out, np.zeros(len(s), dtype=bool)
    out = s.map(conv)
    bad = out.map(lambda v: v is _BAD).to_numpy(dtype=bool)
    return out.where(~bad, None), bad


class _Bad:
    def __repr__(self) -> str:
        return "<bad>"


_BAD = _Bad()


def _coerce_float(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    if pd.api.types.is_bool_dtype(s.dtype):
        return pd.Series([None] * len(s), dtype="float64"), ~_is_null(s)
    out = pd.to_numeric(s, errors="coerce") if not pd.api.types.is_float_dtype(s.dtype) else s
    if pd.api.types.is_object_dtype(s.dtype):
        is_bool = s.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
        out = out.where(~is_bool, np.nan)
    out = out.astype("float64")
    bad = out.isna().to_numpy() & ~_is_null(s)
    return out, bad


def _coerce_int(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    f, bad = _coerce_float(s)
    non_integral = f.notna().to_numpy() & (np.mod(f.fillna(0).to_numpy(), 1) != 0)
    bad = bad | non_integral
    return f.where(~bad, np.nan).astype("Int64"), bad


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _coerce_bool(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    if pd.api.types.is_bool_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        return s.astype(object).where(~s.isna(), None), np.zeros(len(s), dtype=bool)

    def conv(v):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)) and int(v) in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        return _BAD

    out = s.map(conv)
    bad = out.map(lambda v: v is _BAD).to_numpy(dtype=bool)
    return out.where(~bad, None), bad


def _coerce_ts(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        out = s.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_any_dtype(s.dtype):
        out = s.dt.tz_localize("UTC")
    elif pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        # Bare numbers are epoch seconds, the common log convention.
        out = pd.to_datetime(s, unit="s", utc=True, errors="coerce")
    else:
        def conv(v):
            if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
                return pd.NaT
            if isinstance(v, (bool, np.bool_)):
                return pd.NaT
            try:
                if isinstance(v, (int, float, np.integer, np.floating)):
                    return pd.Timestamp(float(v), unit="s", tz="UTC")
                return pd.Timestamp(v).tz_localize("UTC") if pd.Timestamp(v).tzinfo is None \
                    else pd.Timestamp(v).tz_convert("UTC")
            except (ValueError, TypeError, OverflowError):
                return pd.NaT

        out = pd.to_datetime(s.map(conv), utc=True, errors="coerce")
    out = out.astype("datetime64[ms, UTC]")
    bad = out.isna().to_numpy() & ~_is_null(s)
    return out, bad


COERCE = {
    pa.string(): _coerce_str,
    pa.float64(): _coerce_float,
    pa.int32(): _coerce_int,
    pa.bool_(): _coerce_bool,
    TS_TYPE: _coerce_ts,
}
