"""How the admin (and any template that names no format) writes dates and times: as the dashboard
does, to the second and with the zone ("2026-12-07 15:25:03 UTC"). Django's English default
("Dec. 7, 2026, 3:25 p.m.") had neither, so two forks made in one minute could not be ordered
and nothing said which clock. Input formats stay Django's."""

DATETIME_FORMAT = "Y-m-d H:i:s T"
DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i T"
SHORT_DATE_FORMAT = "Y-m-d"
