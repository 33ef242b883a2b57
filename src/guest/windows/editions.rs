//! Which image of the ISO's install.wim the image installs, and with which product key;
//! and the record of the install that tells a later build when an evaluation runs out.
//!
//! Windows names an edition two ways: the image NAME in install.wim (what `edition` gives and
//! Setup's `/IMAGE/NAME` matches, e.g. "Windows Server 2022 SERVERSTANDARD") and its
//! EditionID (WINDOWS/EDITIONID, e.g. "ServerStandard"). Keys and evaluation periods belong to
//! the EditionID, so the table here is keyed by it, never by a display name.

use super::WindowsOptions;
use crate::format::iso::{Iso, IsoError};
use crate::format::wim::{self, WimError, WimImage};
use serde::{Deserialize, Serialize};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// A generic key of one EditionID, for the Windows builds (WINDOWS/VERSION/BUILD) it applies
/// to: Server 2016, 2019, 2022 and 2025 share EditionIDs but not keys.
struct GenericKey {
    edition_id: &'static str,
    builds: RangeInclusive<u32>,
    key: &'static str,
}

/// The Home editions. Microsoft documents no generic key for them (its KMS page is for volume
/// editions, and Home is none), and without a key Setup stops at its product key page on
/// media that hold several editions, until the install's time-out. So such an edition needs
/// the user's `productKey`; without one the install stage refuses it before any VM starts.
pub const HOME_EDITION_IDS: &[&str] = &["Core", "CoreN", "CoreSingleLanguage", "CoreCountrySpecific"];

const ANY_BUILD: RangeInclusive<u32> = 0..=u32::MAX;
const SERVER_2016: RangeInclusive<u32> = 14393..=14393;
const SERVER_2019: RangeInclusive<u32> = 17763..=17763;
const SERVER_2022: RangeInclusive<u32> = 20348..=20348;
const SERVER_2025: RangeInclusive<u32> = 26100..=26100;

const fn key(edition_id: &'static str, builds: RangeInclusive<u32>, key: &'static str) -> GenericKey {
    GenericKey { edition_id, builds, key }
}

/// Microsoft's Generic Volume License Keys (GVLKs), from its page "Key Management Services
/// (KMS) client activation and product keys" (learn.microsoft.com, Windows Server docs),
/// one source for every row. A GVLK tells Setup which edition to install and activates
/// nothing by itself. The page lists no key for the Home editions ([`HOME_EDITION_IDS`]) nor
/// for semi-annual Server builds, so those have none here.
const GENERIC_KEYS: &[GenericKey] = &[
    // Windows 10 and 11: one key for both.
    key("Professional", ANY_BUILD, "W269N-WFGWX-YVC9B-4J6C9-T83GX"),
    key("ProfessionalN", ANY_BUILD, "MH37W-N47XK-V7XM9-C7227-GCQG9"),
    key("ProfessionalWorkstation", ANY_BUILD, "NRG8B-VKK3Q-CXVCJ-9G2XF-6Q84J"),
    key("ProfessionalWorkstationN", ANY_BUILD, "9FNHH-K3HBT-3W4TD-6383H-6XYWF"),
    key("ProfessionalEducation", ANY_BUILD, "6TP4R-GNPTD-KYYHQ-7B7DP-J447Y"),
    key("ProfessionalEducationN", ANY_BUILD, "YVWGF-BXNMC-HTQYQ-CPQ99-66QFC"),
    key("Education", ANY_BUILD, "NW6C2-QMPVW-D7KKK-3GKT6-VCFB2"),
    key("EducationN", ANY_BUILD, "2WH4N-8QGBV-H22JP-CT43Q-MDWWJ"),
    key("Enterprise", ANY_BUILD, "NPPR9-FWDCX-D2C8J-H872K-2YT43"),
    key("EnterpriseN", ANY_BUILD, "DPH2V-TTNVB-4X9Q3-TJR4H-KHJW4"),
    key("EnterpriseG", ANY_BUILD, "YYVX9-NTFWV-6MDM3-9PT4T-4M68B"),
    key("EnterpriseGN", ANY_BUILD, "44RPN-FTY23-9VTTB-MP9BX-T84FV"),
    // Enterprise LTSB 2015 (10240), LTSB 2016 (14393), LTSC 2019 and later.
    key("EnterpriseS", 10240..=10240, "WNMTR-4C88C-JK8YV-HQ7T2-76DF9"),
    key("EnterpriseSN", 10240..=10240, "2F77B-TNFGY-69QQF-B8YKP-D69TJ"),
    key("EnterpriseS", 14393..=14393, "DCPHK-NFMTC-H88MJ-PFHPY-QJ4BJ"),
    key("EnterpriseSN", 14393..=14393, "QFFDN-GRT3P-VKWWX-X7T3R-8B639"),
    key("EnterpriseS", 17763..=u32::MAX, "M7XTQ-FN8P6-TTKYV-9D4CC-J462D"),
    key("EnterpriseSN", 17763..=u32::MAX, "92NFX-8DJQP-P6BBQ-THF9C-7CG2H"),
    // IoT Enterprise LTSC 2021 (19044) and 2024 (26100).
    key("IoTEnterpriseS", 19044..=u32::MAX, "KBN8V-HFGQ4-MGXVD-347P6-PDQGT"),
    // Windows Server, long-term servicing.
    key("ServerStandard", SERVER_2016, "WC2BQ-8NRM3-FDDYY-2BFGV-KHKQY"),
    key("ServerDatacenter", SERVER_2016, "CB7KF-BWN84-R7R2Y-793K2-8XDDG"),
    key("ServerSolution", SERVER_2016, "JCKRF-N37P4-C2D82-9YXRT-4M63B"),
    key("ServerStandard", SERVER_2019, "N69G4-B89J2-4G8F4-WWYCC-J464C"),
    key("ServerDatacenter", SERVER_2019, "WMDGN-G9PQG-XVVXX-R3X43-63DFG"),
    key("ServerSolution", SERVER_2019, "WVDHN-86M7X-466P6-VHXV7-YY726"),
    key("ServerStandard", SERVER_2022, "VDYBN-27WPP-V4HQT-9VMD4-VMK7H"),
    key("ServerDatacenter", SERVER_2022, "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"),
    // "Datacenter: Azure Edition".
    key("ServerTurbine", SERVER_2022, "NTBV8-9K7Q8-V27C6-M2BTV-KHMXV"),
    key("ServerStandard", SERVER_2025, "TVRH6-WHNXV-R9WG3-9XRFY-MY832"),
    key("ServerDatacenter", SERVER_2025, "D764K-2NDRG-47T6Q-P8T8W-YP6DF"),
    key("ServerTurbine", SERVER_2025, "XGN3F-F394H-FD2MY-PP6FD-8MCRC"),
];

/// Evaluation periods: Windows Server evaluations run 180 days, Windows client Enterprise
/// evaluations 90, counted from the install.
pub const SERVER_EVALUATION_DAYS: u32 = 180;
pub const CLIENT_EVALUATION_DAYS: u32 = 90;
/// A build warns this long before an evaluation image expires.
pub const EXPIRY_WARNING_DAYS: u64 = 14;

/// The generic key of `edition_id` for Windows build `build` (None: the WIM does not say,
/// which only matches keys that hold for every build).
pub fn generic_key(edition_id: &str, build: Option<u32>) -> Option<&'static str> {
    GENERIC_KEYS
        .iter()
        .filter(|k| k.edition_id == edition_id)
        .find(|k| match build {
            Some(build) => k.builds.contains(&build),
            None => k.builds == ANY_BUILD,
        })
        .map(|k| k.key)
}

/// Evaluation editions ("ServerStandardEval", "EnterpriseEval", ...) install without a key
/// and run for this many days.
pub fn evaluation_days(edition_id: &str) -> Option<u32> {
    if !edition_id.ends_with("Eval") {
        None
    } else if edition_id.starts_with("Server") {
        Some(SERVER_EVALUATION_DAYS)
    } else {
        Some(CLIENT_EVALUATION_DAYS)
    }
}

/// The chosen image, as the install record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edition {
    /// Its index in install.wim (Setup's `/IMAGE/INDEX`).
    pub index: u32,
    /// Its NAME (Setup's `/IMAGE/NAME`).
    pub name: String,
    pub edition_id: Option<String>,
    pub evaluation_days: Option<u32>,
}

/// The product key the answer file should give Setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductKey {
    /// `productKey` of the image: the user's key wins.
    User(String),
    /// The generic key of the edition's EditionID.
    Generic(&'static str),
    /// Evaluation media install without a key (and reject one).
    Evaluation,
    /// No key is known for the EditionID; Setup gets none.
    Unknown,
}

impl ProductKey {
    /// The key to put into the answer file's `ProductKey`, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ProductKey::User(key) => Some(key),
            ProductKey::Generic(key) => Some(key),
            ProductKey::Evaluation | ProductKey::Unknown => None,
        }
    }
}

/// What the check before the install found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The install image inside the ISO, e.g. "sources/install.wim".
    pub file: String,
    pub edition: Edition,
    pub key: ProductKey,
}

impl Selection {
    /// One progress line; it never shows the user's own key.
    pub fn describe(&self) -> String {
        let e = &self.edition;
        let id = e.edition_id.as_deref().unwrap_or("none");
        let key = match &self.key {
            ProductKey::User(_) => "product key: yours (productKey)".to_owned(),
            ProductKey::Generic(key) => format!("product key: the generic key of {id}, {key}"),
            ProductKey::Evaluation => {
                format!(
                    "an evaluation edition for {} days from the install: no product key",
                    e.evaluation_days.unwrap_or(0)
                )
            }
            ProductKey::Unknown => format!("no generic key is known for EditionID {id}: Setup gets no product key"),
        };
        format!("edition \"{}\" is image {} of {} (EditionID {id}); {key}", e.name, e.index, self.file)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EditionError {
    #[error("{0}")]
    Images(#[source] InstallImagesError),
    #[error(
        "edition \"{wanted}\" is not in {}'s {file}, which has: {}{}",
        iso.display(),
        listed(available),
        near_miss(wanted, available)
    )]
    NotInImage { iso: PathBuf, file: String, wanted: String, available: Vec<WimImage> },
    /// A Home edition without `productKey`: Setup would wait at its key page.
    #[error(
        "edition \"{}\" is a Home edition (EditionID {}), for which Microsoft publishes \
         no generic key, and without a key Setup stops at its product key page until the time-out: \
         set the image's productKey to a key of this edition{}",
        .0.name,
        .0.edition_id,
        keyless_choice(.0)
    )]
    NeedsProductKey(Box<KeyNeeded>),
}

/// An edition that needs the user's key, and the images of the same WIM that need none.
#[derive(Debug)]
pub struct KeyNeeded {
    pub iso: PathBuf,
    pub file: String,
    pub name: String,
    pub edition_id: String,
    /// The names of the images with a generic key, and of evaluation editions.
    pub keyless: Vec<String>,
}

/// The images of a WIM as `"NAME" (EDITIONID), ...`.
fn listed(available: &[WimImage]) -> String {
    let listed: Vec<String> = available
        .iter()
        .map(|i| format!("\"{}\" ({})", i.name, i.edition_id.as_deref().unwrap_or("no EditionID")))
        .collect();
    listed.join(", ")
}

/// A hint when `wanted` is an image's name in another case, or an image's display name.
fn near_miss(wanted: &str, available: &[WimImage]) -> String {
    if let Some(near) = available.iter().find(|i| i.name.eq_ignore_ascii_case(wanted)) {
        format!("; names are compared exactly, and \"{}\" differs only in case", near.name)
    } else if let Some(near) = available.iter().find(|i| i.display_name.as_deref() == Some(wanted)) {
        format!("; \"{wanted}\" is the display name of \"{}\": give its name", near.name)
    } else {
        String::new()
    }
}

/// The editions of the same WIM to choose instead, if there are any.
fn keyless_choice(needed: &KeyNeeded) -> String {
    if needed.keyless.is_empty() {
        return String::new();
    }
    let names: Vec<String> = needed.keyless.iter().map(|name| format!("\"{name}\"")).collect();
    format!(
        ", or choose an edition of {}'s {} that needs none: {}",
        needed.iso.display(),
        needed.file,
        names.join(", ")
    )
}

/// Picks the image whose NAME is `edition` exactly, as Setup's `/IMAGE/NAME` does, and its key.
pub fn select(
    iso: &Path,
    file: &str,
    images: &[WimImage],
    edition: &str,
    user_key: Option<&str>,
) -> Result<Selection, EditionError> {
    let Some(image) = images.iter().find(|i| i.name == edition) else {
        return Err(EditionError::NotInImage {
            iso: iso.to_path_buf(),
            file: file.to_owned(),
            wanted: edition.to_owned(),
            available: images.to_vec(),
        });
    };
    let edition_id = image.edition_id.clone();
    if let (None, Some(id)) = (user_key, edition_id.as_deref()) {
        if HOME_EDITION_IDS.contains(&id) {
            let keyless = images
                .iter()
                .filter(|i| {
                    i.edition_id
                        .as_deref()
                        .is_some_and(|id| evaluation_days(id).is_some() || generic_key(id, i.build).is_some())
                })
                .map(|i| i.name.clone())
                .collect();
            return Err(EditionError::NeedsProductKey(Box::new(KeyNeeded {
                iso: iso.to_path_buf(),
                file: file.to_owned(),
                name: image.name.clone(),
                edition_id: id.to_owned(),
                keyless,
            })));
        }
    }
    let evaluation_days = edition_id.as_deref().and_then(evaluation_days);
    let key = match (user_key, edition_id.as_deref(), evaluation_days) {
        (Some(key), _, _) => ProductKey::User(key.to_owned()),
        (None, _, Some(_)) => ProductKey::Evaluation,
        (None, Some(id), None) => generic_key(id, image.build).map_or(ProductKey::Unknown, ProductKey::Generic),
        (None, None, None) => ProductKey::Unknown,
    };
    Ok(Selection {
        file: file.to_owned(),
        edition: Edition { index: image.index, name: image.name.clone(), edition_id, evaluation_days },
        key,
    })
}

/// Where Windows Setup takes the images from; an ESD is a WIM with solid compression.
pub const INSTALL_IMAGE_PATHS: [&str; 2] = ["sources/install.wim", "sources/install.esd"];

/// The install image of an ISO and the images it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallImages {
    pub iso: PathBuf,
    /// The path inside the ISO, as the ISO spells it.
    pub file: String,
    pub images: Vec<WimImage>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallImagesError {
    #[error("{0}")]
    Iso(#[source] IsoError),
    #[error("the ISO {}: {file} is not a WIM Windows Setup can read: {error}", iso.display())]
    Wim {
        iso: PathBuf,
        file: String,
        #[source]
        error: WimError,
    },
}

/// The images of the ISO's `sources/install.wim` (or `install.esd`).
pub fn install_images(iso_path: &Path) -> Result<InstallImages, InstallImagesError> {
    let iso = Iso::open(iso_path).map_err(InstallImagesError::Iso)?;
    let file = iso.find_first(&INSTALL_IMAGE_PATHS).map_err(InstallImagesError::Iso)?;
    let images = wim::read_images(
        file.size,
        |offset, len| iso.read(&file, offset, len).map_err(InstallImagesError::Iso),
        |error| InstallImagesError::Wim { iso: iso_path.to_path_buf(), file: file.path.clone(), error },
    )?;
    Ok(InstallImages { iso: iso_path.to_path_buf(), file: file.path, images })
}

/// The check before the install boots: the edition is in the ISO's install.wim.
pub fn check_iso(iso: &Path, options: &WindowsOptions) -> Result<Selection, EditionError> {
    let found = install_images(iso).map_err(EditionError::Images)?;
    select(iso, &found.file, &found.images, &options.edition, options.product_key.as_deref())
}

/// The install stage's record, next to the installed disk.
pub const INSTALL_RECORD: &str = "install.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallRecord {
    /// Seconds since 1970-01-01 UTC.
    pub installed_at_secs: u64,
    /// The same, as "YYYY-MM-DDTHH:MM:SSZ".
    pub installed_at: String,
    /// Windows images only.
    pub edition: Option<Edition>,
    /// Evaluation editions: the day the evaluation ends, "YYYY-MM-DD".
    pub evaluation_ends: Option<String>,
}

impl InstallRecord {
    pub fn new(installed_at_secs: u64, edition: Option<Edition>) -> InstallRecord {
        let evaluation_ends = edition
            .as_ref()
            .and_then(|e| e.evaluation_days)
            .map(|days| iso_date(installed_at_secs + u64::from(days) * SECS_PER_DAY));
        InstallRecord { installed_at_secs, installed_at: iso_date_time(installed_at_secs), edition, evaluation_ends }
    }

    /// A warning when the evaluation ends within [`EXPIRY_WARNING_DAYS`] of `now_secs`, or
    /// has ended.
    pub fn expiry_warning(&self, now_secs: u64) -> Option<String> {
        let edition = self.edition.as_ref()?;
        let days = edition.evaluation_days?;
        let ends = self.installed_at_secs + u64::from(days) * SECS_PER_DAY;
        let what = format!(
            "warning: this image is an evaluation edition ({}, {days} days from its install on {})",
            edition.edition_id.as_deref().unwrap_or("?"),
            iso_date(self.installed_at_secs)
        );
        let renew = "delete the image's installed and image store paths and build it again: a new install starts a new evaluation";
        if now_secs >= ends {
            let ago = (now_secs - ends) / SECS_PER_DAY;
            Some(format!("{what}; it expired on {}, {ago} days ago; {renew}", iso_date(ends)))
        } else if ends - now_secs <= EXPIRY_WARNING_DAYS * SECS_PER_DAY {
            let left = (ends - now_secs) / SECS_PER_DAY;
            let when = if left == 0 { "in less than a day".to_owned() } else { format!("in {left} days") };
            Some(format!("{what}; it expires on {}, {when}; {renew}", iso_date(ends)))
        } else {
            None
        }
    }

    /// The record of the install an image (the suspend stage's output) was made from: the
    /// suspend stage copies it into the image.
    pub fn of_image(image: &Path) -> Option<InstallRecord> {
        serde_json::from_str(&std::fs::read_to_string(image.join(INSTALL_RECORD)).ok()?).ok()
    }
}

const SECS_PER_DAY: u64 = 86_400;

/// "YYYY-MM-DD" of a time in seconds since 1970-01-01 UTC.
pub fn iso_date(secs: u64) -> String {
    let (y, m, d) = civil_date(secs / SECS_PER_DAY);
    format!("{y:04}-{m:02}-{d:02}")
}

/// "YYYY-MM-DDTHH:MM:SSZ".
pub fn iso_date_time(secs: u64) -> String {
    let s = secs % SECS_PER_DAY;
    format!("{}T{:02}:{:02}:{:02}Z", iso_date(secs), s / 3600, s / 60 % 60, s % 60)
}

/// The proleptic Gregorian (year, month, day) `days` after 1970-01-01: counted in 400-year
/// eras of 146097 days, each starting on March 1st so that the leap day ends the year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 1970-01-01 is day 719468 counted from 0000-03-01.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::windows::test_util::{temp_path, tool_available};
    use std::process::Command;

    fn image(index: u32, name: &str, edition_id: &str, build: Option<u32>) -> WimImage {
        WimImage {
            index,
            name: name.into(),
            display_name: None,
            edition_id: Some(edition_id.into()),
            installation_type: None,
            build,
        }
    }

    fn consumer_media() -> Vec<WimImage> {
        vec![
            image(1, "Windows 11 Home", "Core", Some(26100)),
            image(2, "Windows 11 Education", "Education", Some(26100)),
            image(3, "Windows 11 Pro", "Professional", Some(26100)),
        ]
    }

    #[test]
    fn an_edition_not_in_the_wim_lists_the_names_there() {
        let err =
            select(Path::new("/x/win.iso"), "sources/install.wim", &consumer_media(), "Windows 11 Ultimate", None)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "edition \"Windows 11 Ultimate\" is not in /x/win.iso's sources/install.wim, which has: \
             \"Windows 11 Home\" (Core), \"Windows 11 Education\" (Education), \"Windows 11 Pro\" (Professional)"
        );
        let err = select(Path::new("/x/win.iso"), "sources/install.wim", &consumer_media(), "windows 11 pro", None)
            .unwrap_err();
        assert!(
            err.to_string().ends_with("; names are compared exactly, and \"Windows 11 Pro\" differs only in case"),
            "{err}"
        );
        let mut server = image(2, "Windows Server 2022 SERVERSTANDARD", "ServerStandard", Some(20348));
        server.display_name = Some("Windows Server 2022 Standard (Desktop Experience)".into());
        let err = select(
            Path::new("/s.iso"),
            "sources/install.wim",
            &[server],
            "Windows Server 2022 Standard (Desktop Experience)",
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "; \"Windows Server 2022 Standard (Desktop Experience)\" is the display name of \"Windows Server 2022 SERVERSTANDARD\": give its name"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_key_is_the_users_else_none_for_evaluations_else_the_generic_one() {
        let iso = Path::new("/x.iso");
        let pro = select(iso, "sources/install.wim", &consumer_media(), "Windows 11 Pro", None).unwrap();
        assert_eq!(pro.key, ProductKey::Generic("W269N-WFGWX-YVC9B-4J6C9-T83GX"));
        assert_eq!(
            pro.edition,
            Edition {
                index: 3,
                name: "Windows 11 Pro".into(),
                edition_id: Some("Professional".into()),
                evaluation_days: None
            }
        );
        assert_eq!(
            pro.describe(),
            "edition \"Windows 11 Pro\" is image 3 of sources/install.wim (EditionID Professional); \
             product key: the generic key of Professional, W269N-WFGWX-YVC9B-4J6C9-T83GX"
        );
        let own = select(
            iso,
            "sources/install.wim",
            &consumer_media(),
            "Windows 11 Pro",
            Some("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"),
        )
        .unwrap();
        assert_eq!(own.key.key(), Some("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"));
        assert!(!own.describe().contains("AAAAA"), "the user's key is not printed");
        let eval = [image(1, "Windows Server 2025 SERVERDATACENTER", "ServerDatacenterEval", Some(26100))];
        let eval = select(iso, "sources/install.wim", &eval, "Windows Server 2025 SERVERDATACENTER", None).unwrap();
        assert_eq!((eval.key.clone(), eval.edition.evaluation_days), (ProductKey::Evaluation, Some(180)));
        assert!(eval.describe().ends_with("an evaluation edition for 180 days from the install: no product key"));
    }

    /// Item: Home editions got no key, and Setup then waited at its key page until the
    /// time-out. Microsoft documents no generic key for them: the install stage refuses such
    /// an edition without `productKey`, before any VM starts, and names the editions that
    /// need none.
    #[test]
    fn a_home_edition_needs_the_users_key() {
        let iso = Path::new("/x.iso");
        for (name, id) in [
            ("Windows 11 Home", "Core"),
            ("Windows 11 Home N", "CoreN"),
            ("Windows 11 Home Single Language", "CoreSingleLanguage"),
            ("Windows 11 Home China", "CoreCountrySpecific"),
        ] {
            let mut media = consumer_media();
            media.push(image(4, name, id, Some(26100)));
            let err = select(iso, "sources/install.wim", &media, name, None).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "edition \"{name}\" is a Home edition (EditionID {id}), for which Microsoft publishes no generic key, \
                     and without a key Setup stops at its product key page until the time-out: set the image's \
                     productKey to a key of this edition, or choose an edition of /x.iso's sources/install.wim that \
                     needs none: \"Windows 11 Education\", \"Windows 11 Pro\""
                )
            );
            let own = select(iso, "sources/install.wim", &media, name, Some("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")).unwrap();
            assert_eq!(own.key, ProductKey::User("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE".into()));
        }
        let only_home = [image(1, "Windows 10 Home", "Core", Some(19045))];
        let err = select(iso, "sources/install.wim", &only_home, "Windows 10 Home", None).unwrap_err();
        assert!(err.to_string().ends_with("set the image's productKey to a key of this edition"), "{err}");
        // Other EditionIDs without a listed key still install without one.
        let other = [image(1, "Windows 11 Pro Single Language", "ProfessionalSingleLanguage", Some(26100))];
        let other = select(iso, "sources/install.wim", &other, "Windows 11 Pro Single Language", None).unwrap();
        assert_eq!(other.key, ProductKey::Unknown);
    }

    #[test]
    fn server_keys_depend_on_the_build() {
        assert_eq!(generic_key("ServerStandard", Some(17763)), Some("N69G4-B89J2-4G8F4-WWYCC-J464C"));
        assert_eq!(generic_key("ServerStandard", Some(20348)), Some("VDYBN-27WPP-V4HQT-9VMD4-VMK7H"));
        assert_eq!(generic_key("ServerDatacenter", Some(26100)), Some("D764K-2NDRG-47T6Q-P8T8W-YP6DF"));
        assert_eq!(generic_key("ServerStandard", Some(99999)), None);
        assert_eq!(generic_key("ServerStandard", None), None, "no build: no guess between versions");
        assert_eq!(generic_key("Enterprise", None), Some("NPPR9-FWDCX-D2C8J-H872K-2YT43"));
        assert_eq!(generic_key("EnterpriseS", Some(19044)), Some("M7XTQ-FN8P6-TTKYV-9D4CC-J462D"));
        assert_eq!(generic_key("Core", Some(26100)), None);
    }

    #[test]
    fn every_key_is_well_formed_and_each_edition_and_build_has_one() {
        for (i, k) in GENERIC_KEYS.iter().enumerate() {
            let groups: Vec<&str> = k.key.split('-').collect();
            assert!(
                groups.len() == 5
                    && groups
                        .iter()
                        .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())),
                "{}",
                k.key
            );
            for other in &GENERIC_KEYS[i + 1..] {
                let overlap = other.builds.start() <= k.builds.end() && k.builds.start() <= other.builds.end();
                assert!(!(other.edition_id == k.edition_id && overlap), "{} twice", k.edition_id);
            }
        }
    }

    #[test]
    fn evaluation_periods() {
        assert_eq!(evaluation_days("ServerStandardEval"), Some(180));
        assert_eq!(evaluation_days("EnterpriseEval"), Some(90));
        assert_eq!(evaluation_days("EnterpriseSEval"), Some(90));
        assert_eq!(evaluation_days("ServerStandard"), None);
    }

    #[test]
    fn dates_are_utc_iso_8601() {
        assert_eq!(iso_date_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_date_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_date_time(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(iso_date(4_107_542_400), "2100-03-01");
    }

    const JAN_1_2025: u64 = 1_735_689_600;

    fn eval_record() -> InstallRecord {
        InstallRecord::new(
            JAN_1_2025,
            Some(Edition {
                index: 1,
                name: "Windows 11 Enterprise Evaluation".into(),
                edition_id: Some("EnterpriseEval".into()),
                evaluation_days: Some(90),
            }),
        )
    }

    #[test]
    fn the_record_keeps_the_date_and_the_end_of_the_evaluation() {
        let record = eval_record();
        assert_eq!(record.installed_at, "2025-01-01T00:00:00Z");
        assert_eq!(record.evaluation_ends.as_deref(), Some("2025-04-01"));
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains("\"installedAtSecs\":1735689600"), "{json}");
        assert_eq!(serde_json::from_str::<InstallRecord>(&json).unwrap(), record);
        assert_eq!(InstallRecord::new(JAN_1_2025, None).evaluation_ends, None);
    }

    #[test]
    fn a_build_warns_two_weeks_before_the_evaluation_ends_and_after() {
        let record = eval_record();
        let day = SECS_PER_DAY;
        assert_eq!(record.expiry_warning(JAN_1_2025 + 75 * day), None);
        let soon = record.expiry_warning(JAN_1_2025 + 80 * day).unwrap();
        assert!(
            soon.starts_with(
                "warning: this image is an evaluation edition (EnterpriseEval, 90 days from its install on 2025-01-01); \
                 it expires on 2025-04-01, in 10 days; "
            ),
            "{soon}"
        );
        assert!(record.expiry_warning(JAN_1_2025 + 90 * day - 1).unwrap().contains("in less than a day"));
        let late = record.expiry_warning(JAN_1_2025 + 93 * day).unwrap();
        assert!(late.contains("; it expired on 2025-04-01, 3 days ago; delete the image's"), "{late}");
        assert_eq!(InstallRecord::new(JAN_1_2025, None).expiry_warning(u64::MAX / 2), None);
    }

    #[test]
    fn the_record_is_read_from_the_image() {
        let image = temp_path("record");
        std::fs::create_dir_all(&image).unwrap();
        assert_eq!(InstallRecord::of_image(&image), None, "an image without a record: no warning");
        std::fs::write(image.join(INSTALL_RECORD), "not json").unwrap();
        assert_eq!(InstallRecord::of_image(&image), None, "a damaged record: no warning");
        std::fs::write(image.join(INSTALL_RECORD), serde_json::to_string(&eval_record()).unwrap()).unwrap();
        assert_eq!(InstallRecord::of_image(&image), Some(eval_record()));
        std::fs::remove_dir_all(image).unwrap();
    }

    #[test]
    fn reads_the_images_of_a_wim_inside_an_iso() {
        let dir = temp_path("wim-iso");
        let Some(wim) = crate::format::wim::tests::wimcapture_two_images(&dir) else { return };
        if !tool_available("genisoimage") {
            return;
        }
        std::fs::create_dir_all(dir.join("tree/sources")).unwrap();
        std::fs::rename(&wim, dir.join("tree/sources/install.wim")).unwrap();
        let iso = dir.join("win.iso");
        let make_iso = || {
            let o = Command::new("genisoimage").args(["-quiet", "-udf", "-o"]).arg(&iso).arg(dir.join("tree")).output();
            let o = o.unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        make_iso();
        let found = install_images(&iso).unwrap();
        assert_eq!(found.file, "sources/install.wim");
        assert_eq!(found.images.len(), 2);
        // Not a WIM at that path: the message names the ISO and the file.
        std::fs::write(dir.join("tree/sources/install.wim"), vec![0u8; 4096]).unwrap();
        make_iso();
        assert_eq!(
            install_images(&iso).unwrap_err().to_string(),
            format!(
                "the ISO {}: sources/install.wim is not a WIM Windows Setup can read: it does not start with the WIM magic \"MSWIM\"",
                iso.display()
            )
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
