//! One module per page. Each handler takes the [`crate::session::Session`] first (not signed
//! in: to the sign-in page), then asks for its role ([`crate::session::Session::require`]).

pub mod accounts;
pub mod audit;
pub mod overview;
pub mod projections;

use maud::{Markup, html};

/// What a page shows in place of data it could not read from the database.
pub(crate) fn database_problem(error: &sqlx::Error) -> Markup {
    html! {
        p.problem {
            "The database (TALLY_DATABASE_URL) cannot be read: " (error)
            ". This part of the page comes back once it is reachable."
        }
    }
}
