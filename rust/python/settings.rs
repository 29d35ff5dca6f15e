//! Settings as Python sees them: typed arguments that parse each value once
//! (`True | False | "require"` into [`ODirect`]/[`Pin`], integers through
//! [`crate::settings::check_int`]), plus `settings_defaults()` and
//! `check_setting()` so `dynblock.Config` takes its defaults and its checks
//! from the same place as the tiers.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString};
use pyo3::Borrowed;

use super::errors::to_py;
use crate::settings::{self, Durability, ODirect, Pin, Prealloc};

/// `True`, `False` or `"require"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TriState {
    On,
    Off,
    Require,
}

fn tri_state(obj: Borrowed<'_, '_, PyAny>, name: &str) -> PyResult<TriState> {
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(if b.is_true() {
            TriState::On
        } else {
            TriState::Off
        });
    }
    if let Ok(s) = obj.cast::<PyString>() {
        if s.to_cow()? == "require" {
            return Ok(TriState::Require);
        }
    }
    Err(PyValueError::new_err(format!(
        "{name} must be True, False or \"require\", got {}",
        obj.repr()?
    )))
}

/// The `o_direct` argument.
pub struct ODirectArg(pub ODirect);

impl<'a, 'py> FromPyObject<'a, 'py> for ODirectArg {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(ODirectArg(match tri_state(obj, "o_direct")? {
            TriState::On => ODirect::Auto,
            TriState::Off => ODirect::Off,
            TriState::Require => ODirect::Require,
        }))
    }
}

/// The `pin` argument.
pub struct PinArg(pub Pin);

impl<'a, 'py> FromPyObject<'a, 'py> for PinArg {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(PinArg(match tri_state(obj, "pin")? {
            TriState::On => Pin::Auto,
            TriState::Off => Pin::Off,
            TriState::Require => Pin::Require,
        }))
    }
}

/// The `preallocate` argument.
pub struct PreallocArg(pub Prealloc);

impl<'a, 'py> FromPyObject<'a, 'py> for PreallocArg {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let v = choice(obj, "preallocate", &Prealloc::NAMES)?;
        Prealloc::parse(&v).map(PreallocArg).map_err(to_py)
    }
}

/// The disk tier's `engine` argument (`Config.disk_engine`).
pub struct EngineArg(pub crate::settings::DiskEngine);

impl<'a, 'py> FromPyObject<'a, 'py> for EngineArg {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        use crate::settings::DiskEngine;
        let v = choice(obj, "disk_engine", &DiskEngine::NAMES)?;
        DiskEngine::parse(&v).map(EngineArg).map_err(to_py)
    }
}

/// A str argument `name` that must be one of `names` (the engine's parse
/// checks which): a TypeError naming them for anything else.
fn choice(obj: Borrowed<'_, '_, PyAny>, name: &str, names: &[&str]) -> PyResult<String> {
    str_arg(&obj, name, &format!("a str, one of {names:?}"))
}

/// An integer setting from any Python integer (numpy integers included;
/// `bool` refused), checked against the setting's bounds.
pub fn int_setting(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    if obj.is_instance_of::<PyBool>() || !obj.hasattr("__index__")? {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int, got {} {}",
            obj.get_type().name()?,
            obj.repr()?
        )));
    }
    let idx = obj.call_method0("__index__")?;
    match idx.extract::<u64>() {
        Ok(v) => settings::check_int(name, v).map_err(to_py),
        Err(_) => Err(to_py(settings::out_of_range(
            name,
            &idx.repr()?.to_string(),
        ))),
    }
}

/// An optional integer argument: the setting's default when `None`.
pub fn int_or_default(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<u64> {
    match obj {
        Some(o) if !o.is_none() => int_setting(o, name),
        _ => Ok(settings::default_int(name)),
    }
}

fn want_bool(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(b.is_true());
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a bool, got {}",
        obj.repr()?
    )))
}

/// A `str` argument's text, or a `TypeError` naming the setting.
fn want_str(value: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    str_arg(value, name, "a str")
}

/// A `str` argument's text, or a `TypeError`: "`name` must be `what`, got ...".
fn str_arg(value: &Bound<'_, PyAny>, name: &str, what: &str) -> PyResult<String> {
    let s = value.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be {what}, got {}",
            value.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })?;
    Ok(s.to_cow()?.into_owned())
}

/// The default of every setting that has one, by name.
#[pyfunction]
pub fn settings_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for s in settings::INTS {
        if let Some(v) = s.default {
            d.set_item(s.name, v)?;
        }
    }
    d.set_item("o_direct", settings::DEFAULT_O_DIRECT)?;
    d.set_item("pin", settings::DEFAULT_PIN)?;
    d.set_item("preallocate", settings::DEFAULT_PREALLOCATE)?;
    d.set_item("durability", settings::DEFAULT_DURABILITY)?;
    d.set_item("checksums", settings::DEFAULT_CHECKSUMS)?;
    d.set_item("write_through", settings::DEFAULT_WRITE_THROUGH)?;
    d.set_item("write_behind", settings::DEFAULT_WRITE_BEHIND)?;
    d.set_item("disk_admission", settings::DEFAULT_DISK_ADMISSION)?;
    d.set_item("disk_engine", settings::DEFAULT_DISK_ENGINE)?;
    d.set_item("host_eviction", settings::DEFAULT_EVICTION)?;
    d.set_item("disk_eviction", settings::DEFAULT_EVICTION)?;
    d.set_item("persist", settings::DEFAULT_PERSIST)?;
    d.set_item("huge_pages", settings::DEFAULT_HUGE_PAGES)?;
    d.set_item("remote_prefix", settings::DEFAULT_REMOTE_PREFIX)?;
    d.set_item("remote_write", settings::DEFAULT_REMOTE_WRITE)?;
    Ok(d)
}

/// Every environment variable dynblock reads ([`settings::ENV`]), as a list
/// of groups: `(tiers, [(var, field, form, choices, meaning), ...])`, the
/// first variable set in a group deciding, later groups overriding earlier
/// ones of the same field. `form` is one of `int`, `int_or_auto`, `bool`,
/// `str`, `choice`, `decimal_gb`, `disables`, `zero_fill`,
/// `seconds_or_none`.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn settings_env() -> Vec<(
    bool,
    Vec<(
        &'static str,
        &'static str,
        &'static str,
        Vec<&'static str>,
        &'static str,
    )>,
)> {
    use settings::EnvForm as F;
    settings::ENV
        .iter()
        .map(|g| {
            let vars = g
                .vars
                .iter()
                .map(|v| {
                    let (form, choices): (&str, &[&str]) = match v.form {
                        F::Int => ("int", &[]),
                        F::IntOrAuto => ("int_or_auto", &[]),
                        F::Bool => ("bool", &[]),
                        F::Str => ("str", &[]),
                        F::Choice(c) => ("choice", c),
                        F::DecimalGb => ("decimal_gb", &[]),
                        F::Disables => ("disables", &[]),
                        F::ZeroFill => ("zero_fill", &[]),
                        F::SecondsOrNone => ("seconds_or_none", &[]),
                    };
                    (v.var, v.field, form, choices.to_vec(), v.meaning)
                })
                .collect();
            (g.tiers, vars)
        })
        .collect()
}

/// Check one setting's value; returns it normalised (a plain `int` for
/// integers). Raises `TypeError`/`ValueError` naming the setting.
#[pyfunction]
pub fn check_setting<'py>(name: &str, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = value.py();
    if settings::INTS.iter().any(|s| s.name == name) {
        return Ok(int_setting(value, name)?.into_pyobject(py)?.into_any());
    }
    match name {
        "o_direct" => {
            value.extract::<ODirectArg>()?;
        }
        "pin" => {
            value.extract::<PinArg>()?;
        }
        "preallocate" => {
            value.extract::<PreallocArg>()?;
        }
        "remote_write" => {
            settings::RemoteWrite::parse(&want_str(value, name)?).map_err(to_py)?;
        }
        "durability" => {
            Durability::parse(&want_str(value, name)?).map_err(to_py)?;
        }
        "disk_engine" => {
            value.extract::<EngineArg>()?;
        }
        "disk_admission" => {
            settings::DiskAdmission::parse(&want_str(value, name)?).map_err(to_py)?;
        }
        "host_eviction" | "disk_eviction" => {
            settings::Eviction::parse(&want_str(value, name)?, name).map_err(to_py)?;
        }
        "checksums" | "write_through" | "write_behind" | "persist" | "huge_pages" | "lock" => {
            want_bool(value, name)?;
        }
        other => {
            return Err(PyValueError::new_err(format!("no setting named {other:?}")));
        }
    }
    Ok(value.clone())
}
