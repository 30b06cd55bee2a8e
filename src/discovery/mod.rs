//! Endpoint sources: they keep the datastore's endpoint set current.

pub mod static_;
