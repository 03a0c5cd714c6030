//! AF_XDP: to be written.
