//! Endpoint sources: they keep the datastore's endpoint set current.

pub mod kube;
pub mod policy;
pub mod static_;
