//! The OVA format, both ways: the tar framing ([`tar`]), the OVF descriptor an export writes
//! ([`ovf`]) and what an import reads of any OVF descriptor and manifest ([`read`]).

pub mod ovf;
pub mod read;
pub mod tar;
