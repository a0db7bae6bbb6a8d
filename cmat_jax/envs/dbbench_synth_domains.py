"""Table domains for the synthetic DBBench generator: table names, columns and value makers.

Each domain describes one kind of table. Columns have a role:
``key`` (identifies a row; values unique per table), ``cat`` (a category with few values, used
for filters and counts), ``num`` (a number, stored as TEXT like every AgentBench column) or
``text`` (free-ish text). Names and values are invented for this project.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

ValueMaker = Callable[[random.Random], str]

FIRST = [
    "Amara",
    "Bruno",
    "Celine",
    "Dmitri",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kaveh",
    "Leona",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sanjay",
    "Talia",
    "Umberto",
    "Vera",
    "Wendell",
    "Ximena",
    "Yusuf",
    "Zofia",
    "Anselm",
    "Brielle",
    "Cyrus",
    "Delphine",
    "Emeka",
    "Fiora",
    "Gideon",
    "Halle",
    "Idris",
    "Juno",
    "Kenji",
    "Lorna",
    "Milan",
    "Noor",
    "Orla",
    "Pavel",
    "Rhea",
    "Soren",
    "Tamsin",
    "Ulla",
    "Viggo",
    "Wren",
    "Yara",
    "Zane",
]
LAST = [
    "Abernathy",
    "Bellweather",
    "Castellan",
    "Drummond",
    "Everly",
    "Falkner",
    "Gallardo",
    "Hollis",
    "Ivers",
    "Jandali",
    "Kowalczyk",
    "Lindqvist",
    "Marchetti",
    "Nakagawa",
    "Okonkwo",
    "Pemberton",
    "Quarles",
    "Rasmussen",
    "Szabo",
    "Thorne",
    "Underhill",
    "Varga",
    "Whitcombe",
    "Yilmaz",
    "Zelenko",
    "Ashdown",
    "Brannigan",
    "Corcoran",
    "Delacroix",
    "Esposito",
    "Fairbanks",
    "Grimaldi",
    "Halvorsen",
    "Ishikawa",
    "Jovanovic",
    "Kessler",
    "Lombardi",
    "Mbeki",
    "Novak",
    "Ostrowski",
]
TOWNS = [
    "Alderbrook",
    "Bramble Cove",
    "Cinder Falls",
    "Dunmere",
    "Eastwick",
    "Fernhollow",
    "Glenarrow",
    "Halcyon Bay",
    "Ironvale",
    "Juniper Ridge",
    "Kestrel Point",
    "Larkspur",
    "Millhaven",
    "Northam",
    "Oakhurst",
    "Pinecrest",
    "Quarry Hill",
    "Redfern",
    "Saltmarsh",
    "Thistledown",
    "Upton Vale",
    "Willowmere",
    "Yarrowby",
    "Zephyr Downs",
    "Ambergate",
    "Brackenfield",
    "Coldwater",
    "Driftwood",
    "Emberly",
    "Foxmoor",
]
COUNTRIES = [
    "Norway",
    "Chile",
    "Kenya",
    "Portugal",
    "Vietnam",
    "Canada",
    "Peru",
    "Ghana",
    "Finland",
    "Morocco",
    "Uruguay",
    "Japan",
    "Poland",
    "Ireland",
    "Brazil",
    "Nepal",
    "Egypt",
    "Iceland",
    "Mexico",
    "Greece",
    "India",
    "Tunisia",
    "Austria",
    "Colombia",
]
COLORS = ["crimson", "teal", "amber", "ivory", "slate", "olive", "indigo", "coral", "ochre", "jade"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def pick(*values: str) -> ValueMaker:
    return lambda rng: rng.choice(values)


def integer(lo: int, hi: int) -> ValueMaker:
    return lambda rng: str(rng.randint(lo, hi))


def decimal(lo: float, hi: float, places: int = 1) -> ValueMaker:
    return lambda rng: f"{rng.uniform(lo, hi):.{places}f}"


def date(lo_year: int, hi_year: int) -> ValueMaker:
    return lambda rng: f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(lo_year, hi_year)}"


def code(prefix: str, digits: int = 3) -> ValueMaker:
    return lambda rng: f"{prefix}-{rng.randint(10 ** (digits - 1), 10**digits - 1)}"


def compound(*parts: tuple[str, ...]) -> ValueMaker:
    return lambda rng: " ".join(rng.choice(p) for p in parts)


@dataclasses.dataclass(frozen=True)
class Column:
    names: tuple[str, ...]  # alternative headers; one is drawn per table
    role: str  # key | cat | num | text
    make: ValueMaker


@dataclasses.dataclass(frozen=True)
class Domain:
    tables: tuple[str, ...]  # base table names
    entity: str  # what one row is, plural ("ferries")
    columns: tuple[Column, ...]


def C(names: str, role: str, make: ValueMaker) -> Column:
    return Column(tuple(n.strip() for n in names.split("|")), role, make)


TOWN = lambda rng: rng.choice(TOWNS)
COUNTRY = lambda rng: rng.choice(COUNTRIES)

DOMAINS: tuple[Domain, ...] = (
    Domain(("Ferry Departures", "Harbour Ferry Log", "Ferry Timetable"), "ferries", (
        C("Vessel|Ferry Name", "key", compound(("MV", "SS", "Spirit of"), ("Gannet", "Osprey", "Tern", "Puffin", "Kittiwake", "Cormorant", "Heron", "Plover", "Curlew", "Skua", "Fulmar", "Shearwater"), ("I", "II", "III", "IV", "V", "VI"))),
        C("Port|Home Port", "cat", TOWN),
        C("Route Length (km)|Distance km", "num", integer(4, 160)),
        C("Passengers|Passenger Capacity", "num", integer(40, 900)),
        C("Operator|Operating Company", "cat", pick("Bluewake Lines", "Northsea Link", "Tidal Crossings", "Gullwing Ferries")),
        C("First Sailing|Launch Date", "text", date(1978, 2022)),
    )),
    Domain(("Orchard Harvest", "Fruit Yield Records", "Orchard Plots"), "orchard plots", (
        C("Plot|Plot Code", "key", code("PL")),
        C("Fruit|Crop", "cat", pick("apple", "pear", "plum", "cherry", "quince", "apricot")),
        C("Yield (kg)|Harvest kg", "num", integer(150, 4800)),
        C("Trees|Tree Count", "num", integer(12, 400)),
        C("Grower|Farmer", "text", person),
        C("Village|Location", "cat", TOWN),
    )),
    Domain(("Library Branch Loans", "Branch Circulation", "Public Library Branches"), "branches", (
        C("Branch|Branch Name", "key", compound(("Central", "Riverside", "Hilltop", "Old Town", "Meadow", "Station", "Harbour", "Market", "Castle", "Garden", "Mill", "Bridge"), ("Library", "Reading Room", "Branch"))),
        C("District|Borough", "cat", pick("North", "South", "East", "West", "Central")),
        C("Loans|Annual Loans", "num", integer(2000, 95000)),
        C("Members|Registered Members", "num", integer(300, 12000)),
        C("Opened|Year Opened", "num", integer(1890, 2015)),
        C("Head Librarian|Manager", "text", person),
    )),
    Domain(("Volcano Survey", "Volcanic Peaks", "Volcano Monitoring"), "volcanoes", (
        C("Volcano|Peak", "key", compound(("Mount", "Cerro", "Pico", "Monte"), ("Ashcrown", "Brasa", "Caldera", "Ferrum", "Ignis", "Lumen", "Obsidia", "Pyra", "Scoria", "Tephra", "Vulca", "Zolfo"))),
        C("Country|Nation", "cat", COUNTRY),
        C("Elevation (m)|Height m", "num", integer(600, 6200)),
        C("Last Eruption|Last Active", "num", integer(1500, 2023)),
        C("Type|Volcano Type", "cat", pick("stratovolcano", "shield", "caldera", "cinder cone")),
        C("Alert Level|Status", "cat", pick("green", "yellow", "orange")),
    )),
    Domain(("Chess Club Ratings", "Chess Ladder", "Club Chess Players"), "players", (
        C("Player|Member", "key", person),
        C("Club|Chess Club", "cat", pick("Rook & Pawn", "Knight Owls", "Bishop's Gambit", "Castle Keep")),
        C("Rating|Elo", "num", integer(1100, 2450)),
        C("Games|Games Played", "num", integer(5, 140)),
        C("Title|FIDE Title", "cat", pick("none", "CM", "FM", "IM")),
        C("Joined|Member Since", "num", integer(1995, 2023)),
    )),
    Domain(("Bakery Orders", "Pastry Shop Sales", "Bread Orders"), "orders", (
        C("Order ID|Order No", "key", code("ORD", 4)),
        C("Item|Product", "cat", pick("sourdough", "croissant", "rye loaf", "brioche", "baguette", "scone")),
        C("Quantity|Qty", "num", integer(1, 60)),
        C("Price|Unit Price", "num", decimal(0.8, 9.5, 2)),
        C("Customer|Client", "text", person),
        C("Pickup Day|Day", "cat", pick("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")),
    )),
    Domain(("Lighthouse Registry", "Coastal Lighthouses", "Beacon Inventory"), "lighthouses", (
        C("Lighthouse|Light", "key", compound(("Gull", "Storm", "North", "Rock", "Sand", "Cape", "Reef", "Fog", "Star", "Iron"), ("Point", "Head", "Ness", "Light", "Tower", "Beacon"))),
        C("Coast|Region", "cat", pick("Atlantic", "Baltic", "Pacific", "Adriatic", "Arctic")),
        C("Height (m)|Tower Height", "num", integer(8, 65)),
        C("Range (nmi)|Light Range", "num", integer(6, 28)),
        C("Built|Year Built", "num", integer(1780, 1995)),
        C("Keeper|Last Keeper", "text", person),
    )),
    Domain(("Marathon Finishers", "City Marathon Times", "Road Race Finishers"), "runners", (
        C("Runner|Athlete", "key", person),
        C("Country|Nationality", "cat", COUNTRY),
        C("Finish Minutes|Time (min)", "num", integer(128, 290)),
        C("Bib|Bib Number", "num", integer(100, 9999)),
        C("Age Group|Category", "cat", pick("18-29", "30-39", "40-49", "50-59", "60+")),
        C("Club|Running Club", "text", pick("Harriers", "Striders", "Road Runners", "Trail Hounds", "unattached")),
    )),
    Domain(("Observatory Telescopes", "Telescope Inventory", "Star Observatories"), "telescopes", (
        C("Telescope|Instrument", "key", compound(("Aurora", "Borealis", "Cassini", "Draco", "Halley", "Kepler", "Lyra", "Orion", "Sirius", "Vega", "Zenith", "Polaris"), ("Reflector", "Refractor", "Array", "Dish"))),
        C("Site|Mountain Site", "cat", TOWN),
        C("Aperture (cm)|Mirror cm", "num", integer(20, 1040)),
        C("Commissioned|First Light", "num", integer(1901, 2021)),
        C("Band|Wavelength", "cat", pick("optical", "radio", "infrared", "ultraviolet")),
        C("Director|Lead Scientist", "text", person),
    )),
    Domain(("Beekeeping Hives", "Apiary Records", "Honey Production"), "hives", (
        C("Hive|Hive Tag", "key", code("HV")),
        C("Apiary|Yard", "cat", TOWN),
        C("Honey (kg)|Honey Yield", "num", decimal(3, 60, 1)),
        C("Frames|Frame Count", "num", integer(6, 30)),
        C("Queen Color|Queen Mark", "cat", pick("white", "yellow", "red", "green", "blue")),
        C("Beekeeper|Owner", "text", person),
    )),
    Domain(("Concert Hall Bookings", "Recital Schedule", "Music Hall Events"), "concerts", (
        C("Performer|Artist", "key", person),
        C("Venue|Hall", "cat", pick("Grand Hall", "Glass Pavilion", "Cedar Room", "Riverside Stage")),
        C("Tickets Sold|Attendance", "num", integer(80, 2400)),
        C("Ticket Price|Price", "num", decimal(8, 120, 2)),
        C("Genre|Style", "cat", pick("jazz", "folk", "baroque", "choral", "piano")),
        C("Date|Performance Date", "text", date(2015, 2024)),
    )),
    Domain(("Mountain Huts", "Alpine Refuges", "Hiking Shelters"), "huts", (
        C("Hut|Refuge", "key", compound(("Edelweiss", "Gentian", "Marmot", "Ibex", "Chamois", "Glacier", "Larch", "Saddle", "Ridge", "Cairn", "Falcon", "Moraine"), ("Hut", "Refuge", "Shelter", "Cabin"))),
        C("Range|Massif", "cat", pick("Eastern Range", "High Crest", "Silver Ridge", "Iron Peaks")),
        C("Altitude (m)|Elevation", "num", integer(1200, 3800)),
        C("Beds|Bunks", "num", integer(6, 120)),
        C("Open Months|Season Length", "num", integer(2, 12)),
        C("Warden|Host", "text", person),
    )),
    Domain(("Rail Station Footfall", "Commuter Stations", "Station Usage"), "stations", (
        C("Station|Stop", "key", lambda rng: rng.choice(TOWNS) + rng.choice((" Central", " Junction", " Parkway", " Halt", " Road", " North", " South"))),
        C("Line|Rail Line", "cat", pick("Coastal Line", "Valley Line", "Orbital Line", "Express Line")),
        C("Daily Passengers|Entries per Day", "num", integer(120, 48000)),
        C("Platforms|Platform Count", "num", integer(1, 14)),
        C("Zone|Fare Zone", "cat", pick("1", "2", "3", "4", "5")),
        C("Opened|Opening Year", "num", integer(1838, 2019)),
    )),
    Domain(("Film Festival Entries", "Short Film Selection", "Festival Screenings"), "films", (
        C("Film|Title", "key", compound(("The", "A", "Our", "No"), ("Silent", "Paper", "Glass", "Hollow", "Amber", "Last", "Northern", "Quiet", "Broken", "Golden", "Velvet", "Distant"), ("Harbour", "Orchard", "Winter", "Signal", "Garden", "Echo", "Lantern", "Tide", "Meadow", "Compass"))),
        C("Director|Filmmaker", "text", person),
        C("Runtime|Minutes", "num", integer(6, 170)),
        C("Country|Origin", "cat", COUNTRY),
        C("Section|Category", "cat", pick("competition", "documentary", "animation", "debut")),
        C("Jury Score|Score", "num", decimal(4, 9.9, 1)),
    )),
    Domain(("Reservoir Levels", "Water Reservoirs", "Dam Storage"), "reservoirs", (
        C("Reservoir|Lake", "key", compound(("Upper", "Lower", "Great", "Little", "West", "East"), ("Fenwater", "Stillmere", "Greyloch", "Brookdam", "Clearpool", "Marshend", "Cold Tarn", "Hollowmere"))),
        C("River|Feeds From", "cat", pick("Avel", "Tarrow", "Lune", "Mira", "Osk")),
        C("Capacity (ML)|Capacity", "num", integer(500, 90000)),
        C("Fill Percent|Level %", "num", integer(12, 100)),
        C("Completed|Year Completed", "num", integer(1880, 2010)),
        C("Operator|Water Board", "cat", pick("Northwater", "Valley Utilities", "Greenfield Water")),
    )),
    Domain(("Robotics League", "Robot Competition Teams", "Robotics Tournament"), "teams", (
        C("Team|Team Name", "key", compound(("Gear", "Volt", "Servo", "Pixel", "Circuit", "Torque", "Quantum", "Binary", "Laser", "Rocket"), ("Wizards", "Rangers", "Owls", "Titans", "Foxes", "Sparks", "Makers"))),
        C("School|Institution", "cat", lambda rng: rng.choice(TOWNS) + " Academy"),
        C("Points|Score", "num", integer(10, 480)),
        C("Wins|Matches Won", "num", integer(0, 18)),
        C("Division|Bracket", "cat", pick("junior", "senior", "open")),
        C("Captain|Team Lead", "text", person),
    )),
    Domain(("Museum Exhibits", "Gallery Acquisitions", "Exhibit Catalogue"), "exhibits", (
        C("Exhibit|Object", "key", compound(("Bronze", "Carved", "Painted", "Woven", "Gilded", "Ceramic", "Ivory-toned", "Lacquered"), ("Mask", "Vase", "Tapestry", "Helmet", "Compass", "Clock", "Lantern", "Figurine", "Map", "Mirror"), ("of the North", "from the Delta", "of Dunmere", "of the Coast", "of the Plains", "from the Hills"))),
        C("Gallery|Room", "cat", pick("East Wing", "West Wing", "Atrium", "Lower Hall")),
        C("Year Acquired|Acquired", "num", integer(1902, 2023)),
        C("Value (k)|Insured Value", "num", integer(5, 950)),
        C("Material|Medium", "cat", pick("bronze", "wood", "textile", "clay", "silver", "glass")),
        C("Curator|Keeper", "text", person),
    )),
    Domain(("Wind Farm Turbines", "Turbine Output", "Wind Park Units"), "turbines", (
        C("Turbine|Unit", "key", code("WT")),
        C("Farm|Wind Farm", "cat", lambda rng: rng.choice(TOWNS) + " Wind"),
        C("Capacity (MW)|Rated MW", "num", decimal(0.8, 9.5, 1)),
        C("Output (MWh)|Annual Output", "num", integer(900, 32000)),
        C("Hub Height|Hub Height (m)", "num", integer(60, 160)),
        C("Maker|Manufacturer", "cat", pick("Aerovent", "Skyblade", "Nordwind", "Gale Systems")),
    )),
    Domain(("Community Garden Plots", "Allotment Register", "Garden Allotments"), "allotments", (
        C("Plot Holder|Gardener", "key", person),
        C("Site|Garden", "cat", lambda rng: rng.choice(TOWNS) + " Allotments"),
        C("Area (sqm)|Plot Size", "num", integer(20, 250)),
        C("Rent|Annual Rent", "num", integer(15, 140)),
        C("Main Crop|Crop", "cat", pick("beans", "potatoes", "squash", "kale", "tomatoes", "onions")),
        C("Since|Held Since", "num", integer(1990, 2024)),
    )),
    Domain(("Sailing Regatta", "Yacht Race Results", "Regatta Entries"), "boats", (
        C("Yacht|Boat", "key", compound(("Sea", "Wind", "Salt", "Blue", "Silver", "Wild", "Morning", "Swift"), ("Dancer", "Runner", "Spirit", "Hawk", "Whisper", "Arrow", "Drifter", "Star"))),
        C("Skipper|Helm", "text", person),
        C("Class|Boat Class", "cat", pick("dinghy", "keelboat", "catamaran", "cruiser")),
        C("Elapsed (min)|Race Minutes", "num", integer(35, 400)),
        C("Crew|Crew Size", "num", integer(1, 12)),
        C("Club|Yacht Club", "cat", pick("Royal Tern YC", "Bay Sailing Club", "North Pier YC")),
    )),
    Domain(("Vineyard Vintages", "Winery Bottlings", "Estate Wines"), "wines", (
        C("Wine|Label", "key", compound(("Chateau", "Domaine", "Clos", "Quinta", "Bodega"), ("Argent", "Belrose", "Corvin", "Delmar", "Estoril", "Florac", "Granval", "Lunel", "Montsec", "Rivaz"))),
        C("Grape|Variety", "cat", pick("merlot", "riesling", "syrah", "tempranillo", "chardonnay")),
        C("Vintage|Year", "num", integer(1985, 2022)),
        C("Bottles|Bottles Made", "num", integer(600, 60000)),
        C("Rating|Critic Score", "num", integer(78, 99)),
        C("Region|Appellation", "cat", COUNTRY),
    )),
    Domain(("Airport Gates", "Regional Airports", "Airfield Traffic"), "airports", (
        C("Airport|Airfield", "key", lambda rng: rng.choice(TOWNS) + rng.choice((" Airport", " Airfield", " Aerodrome", " Regional"))),
        C("Code|IATA", "text", lambda rng: "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(3))),
        C("Runways|Runway Count", "num", integer(1, 5)),
        C("Passengers (k)|Annual Passengers", "num", integer(20, 18000)),
        C("Country|State", "cat", COUNTRY),
        C("Hub Carrier|Main Airline", "cat", pick("Skylark Air", "Polar Wings", "Meridian", "Coastjet")),
    )),
    Domain(("Rowing Crews", "Boat Race Crews", "Rowing Club Results"), "crews", (
        C("Crew|Boat Name", "key", compound(("Blue", "Gold", "Scarlet", "Green", "Black", "White"), ("Heron", "Otter", "Swan", "Pike", "Kingfisher", "Grebe", "Mallard")), ),
        C("Club|Boat Club", "cat", lambda rng: rng.choice(TOWNS) + " RC"),
        C("Time (s)|Race Seconds", "num", decimal(330, 520, 2)),
        C("Lane|Start Lane", "num", integer(1, 8)),
        C("Boat Type|Event", "cat", pick("eight", "four", "pair", "single scull")),
        C("Coach|Head Coach", "text", person),
    )),
    Domain(("Pharmacy Stock", "Dispensary Inventory", "Medicine Stock Levels"), "products", (
        C("Product|Medicine", "key", compound(("Calmex", "Dorvan", "Fenora", "Glyptol", "Histavo", "Lumidex", "Noxilan", "Pradil", "Restonil", "Tavex"), ("10mg", "20mg", "50mg", "syrup", "cream", "drops"))),
        C("Supplier|Distributor", "cat", pick("MedSource", "Apex Pharma", "Greenleaf Health")),
        C("Units|Units in Stock", "num", integer(0, 900)),
        C("Unit Cost|Cost", "num", decimal(0.5, 45, 2)),
        C("Shelf|Aisle", "cat", pick("A", "B", "C", "D")),
        C("Expiry|Expiry Date", "text", date(2025, 2029)),
    )),
)  # fmt: skip

TABLE_QUALIFIERS = (
    "", "", "", " 2019", " 2021", " 2023", " (Draft)", " Archive", " North", " South",
    " Summary", " Register", " Overview", " Season Two",
)  # fmt: skip

# Words for table names unrelated to the table's domain. Real DB tasks name their tables after
# whatever the source page was about; a model that only ever saw the domains' own few dozen
# names learns to write one of those instead of copying the name it was given.
NAME_TOPICS = (
    "Coastal", "National", "Regional", "Olympic", "Municipal", "Railway", "Chess", "Cycling",
    "Tennis", "Opera", "Television", "Radio", "Island", "Mountain", "River", "Canal", "Castle",
    "Cathedral", "Senate", "Parliament", "Mayoral", "Provincial", "Colonial", "Medieval", "Lunar",
    "Arctic", "Desert", "Harbour", "Tram", "Subway", "Hockey", "Cricket", "Rugby", "Volleyball",
    "Swimming", "Skiing", "Boxing", "Wrestling", "Fencing", "Archery", "Polo", "Badminton",
    "Snooker", "Darts", "Film", "Poetry", "Novel", "Comic", "Theatre", "Ballet", "Jazz", "Choir",
    "Orchestra", "Circus", "Museum", "Zoo", "Aquarium", "Satellite", "Rocket", "Submarine",
    "Frigate", "Aircraft", "Helicopter", "Glider", "Steam", "Diesel", "Electric", "Nuclear",
    "Solar", "Copper", "Diamond", "Pearl", "Handball", "Lacrosse", "Curling", "Rowing", "Sumo",
    "Judo", "Karate", "Triathlon", "Biathlon", "Motorcycle", "Rally", "Speedway", "Grand Prix",
    "Figure Skating", "Ice Dance", "Gymnastics", "Weightlifting", "Water Polo", "Softball",
    "Netball", "Bowling", "Billiards", "Sailing", "Surfing", "Marathon", "Relay", "Decathlon",
    "Presidential", "Gubernatorial", "Municipal Council", "Royal", "Papal", "Imperial", "Naval",
    "Military", "Diplomatic", "Consular", "Missionary", "Academic", "Scientific", "Medical",
    "Literary", "Architectural", "Botanic", "Geological", "Volcanic", "Seismic", "Tropical",
    "Polar", "Alpine", "Prairie", "Lighthouse", "Ferry", "Canal Boat", "Airship", "Bus",
    "Trolleybus", "Monorail", "Cable Car", "Funicular", "Highway", "Motorway", "Turnpike",
)  # fmt: skip
NAME_HEADS = (
    "Winners", "Results", "Records", "Standings", "Candidates", "Members", "Episodes", "Seasons",
    "Releases", "Singles", "Stations", "Routes", "Lines", "Clubs", "Teams", "Players", "Coaches",
    "Champions", "Medalists", "Nominees", "Awards", "Rankings", "Fixtures", "Matches", "Races",
    "Drivers", "Riders", "Vessels", "Bridges", "Towers", "Buildings", "Stadiums", "Venues",
    "Districts", "Parishes", "Counties", "Constituencies", "Mayors", "Governors", "Ministers",
    "Bishops", "Monarchs", "Envoys", "Schools", "Universities", "Colleges", "Hospitals",
    "Churches", "Temples", "Peaks", "Lakes", "Islands", "Storms", "Launches", "Missions",
    "Flights", "Engines", "Airlines", "Companies", "Brands", "Games", "Channels", "Programmes",
    "Broadcasts", "Characters", "Cast", "Performances", "Tours", "Concerts", "Albums", "Songs",
    "Sales", "Budgets", "Elections", "Referendums", "Treaties", "Battles", "Regiments",
    "Squadrons", "Divisions", "Draft Picks", "Transfers", "Contracts", "Statistics", "Scorers",
    "Appearances", "Career", "History", "Timeline", "Roster", "Squad", "Line-up", "Schedule",
    "Calendar", "Events", "Heats", "Finals", "Qualifiers", "Leaders", "Holders", "Officials",
    "Judges", "Referees", "Delegates", "Founders", "Owners", "Manufacturers", "Models",
    "Production", "Output", "Exports", "Attendance", "Ratings", "Discography", "Filmography",
    "Bibliography", "Honours", "Titles", "Achievements", "Milestones", "Incidents", "Accidents",
)  # fmt: skip

# -- benchmark-shaped tables ------------------------------------------------------------------
# AgentBench's DB tables come from Wikipedia (WikiSQL, WikiTableQuestions, ...), widened with
# extra rows. Compared with the domains above they have more columns, headers with punctuation
# ("Pts.", "Win %", "Team(s)") or made of digits ("2005"), numbers written for people ("12,400",
# "$3.1 million"), placeholder cells ("—", ""), accented names, and tables whose first column
# is not a key (a year, a rank) so values repeat. The makers below add those traits to any
# domain table; role "fmt" marks a number written for people (shown and looked up, never
# compared or summed: MySQL and SQLite read "12,400" as 12).

FIRST_INTL = (
    "José", "Zoë", "Björn", "Łukasz", "Inês", "Søren", "Ángel", "Chloé", "Jürgen", "Çağla",
    "Mária", "Tomás", "Noémie", "Håkon", "Dušan", "Anaïs",
)  # fmt: skip
LAST_INTL = (
    "Müller", "Ødegaard", "Nuñez", "Šimić", "Brontë", "Çelik", "Gonçalves", "Dvořák", "Ågren",
    "Fernández", "Lefèvre", "Wójcik", "Þórsson", "Kovač",
)  # fmt: skip
PLACEHOLDERS = ("—", "–", "", "N/A", "n/a", "-")
ROUND_RESULTS = ("W", "F", "SF", "QF", "R16", "3R", "2R", "1R", "RR", "—", "A")


def person_intl(rng: random.Random) -> str:
    """A name, one in four with letters outside ASCII."""
    if rng.random() < 0.25:
        return f"{rng.choice(FIRST_INTL)} {rng.choice(LAST_INTL + tuple(LAST))}"
    return person(rng)


def thousands(lo: int, hi: int) -> ValueMaker:
    return lambda rng: f"{rng.randint(lo, hi):,}"


def money(lo: int, hi: int) -> ValueMaker:
    def make(rng: random.Random) -> str:
        v = rng.randint(lo, hi)
        if v >= 1_000_000 and rng.random() < 0.5:
            return f"${v / 1_000_000:.1f} million"
        return f"${v:,}"

    return make


def with_blanks(make: ValueMaker, share: float) -> ValueMaker:
    """``make``, but a placeholder ("—", "", "N/A", ...) in a ``share`` of the cells."""
    return lambda rng: rng.choice(PLACEHOLDERS) if rng.random() < share else make(rng)


def ordinal(lo: int, hi: int) -> ValueMaker:
    def make(rng: random.Random) -> str:
        n = rng.randint(lo, hi)
        suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        return f"{n}{suffix}"

    return make


# Extra columns a benchmark-shaped table may carry besides its domain's own. "lead" columns
# (a year, a rank) may stand first, before the key, as Wikipedia tables often do.
EXTRA_COLUMNS: tuple[Column, ...] = (
    C("Rank|Pos.|No.|#|Place", "num", integer(1, 30)),
    C("Year|Season|Yr.", "num", integer(1961, 2023)),
    C("Notes|Remarks|Comment(s)|Ref.", "text", with_blanks(
        pick("debut", "record", "retired", "on loan", "new", "[1]", "[2]", "relegated", "tie"), 0.5)),
    C("Win %|Share (%)|Pct.|% of total", "num", decimal(0, 100, 1)),
    C("Prize Money|Budget ($)|Revenue (US$)|Earnings", "fmt", money(4_000, 9_000_000)),
    C("Attendance|Crowd|Population|Votes", "fmt", thousands(1_200, 250_000)),
    C("Position|Finish|Result", "cat", ordinal(1, 40)),
    C("Contact|Leader(s)|Chair/President", "text", person_intl),
    C("Area (km²)|Surface (km²)|Temp. (°C)", "num", decimal(1, 900, 1)),
)  # fmt: skip
LEAD_HEADERS = {"Rank", "Pos.", "No.", "#", "Place", "Year", "Season", "Yr."}


def year_columns(rng: random.Random) -> list[Column]:
    """Two to four consecutive year-named columns (results per season: "W", "SF", "—")."""
    start = rng.randint(1995, 2018)
    return [
        Column((str(y),), "cat", pick(*ROUND_RESULTS))
        for y in range(start, start + rng.randint(2, 4))
    ]


def header_style(rng: random.Random) -> Callable[[str], str]:
    """One header style per table: as written, sentence case ("Home team"), or lower case."""
    style = rng.random()
    if style < 0.7:
        return lambda h: h
    if style < 0.95:
        return lambda h: h[:1] + h[1:].lower()
    return lambda h: h.lower()
