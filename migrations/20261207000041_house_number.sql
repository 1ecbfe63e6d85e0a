-- The house number a caller keyed on the phone (after the ZIP, for services whose menu asks
-- for it); the street is in their recording. Open311 `address` shows it with the ZIP.
ALTER TABLE tickets ADD COLUMN house_number TEXT;
