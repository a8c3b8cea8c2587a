//! Publishing a model to the Hugging Face Hub (`chatvec push`), through the
//! Hub's HTTP API as huggingface_hub uses it, with no git and no Python:
//! `screen` decides what may leave the machine, `remote` speaks the
//! repository API (state, creation, preupload, commit) and `lfs` the
//! large-file protocol. The job itself (checks, plan, report) is
//! `job::push`.

pub(crate) mod lfs;
pub(crate) mod remote;
pub(crate) mod screen;
